"""Executing a notebook as papermill does: the values go into a cell inserted after the one
tagged ``parameters``, then every cell runs in a real kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def execute(name: str, params: dict[str, Any], cwd: Path, timeout: int = 300):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'"
    source = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb) -> list[dict[str, Any]]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def errors(nb) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs(nb) if o.get("output_type") == "error"]


def images(nb) -> int:
    return sum(1 for o in outputs(nb) if "image/png" in o.get("data", {}))


def text(nb) -> str:
    """Printed text and the plain text of displayed values (tables)."""
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs(nb))
