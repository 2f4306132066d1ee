"""Reviewing a sweep from MLflow: the trials table, a heatmap of the validation metric over
two searched keys (hidden size x depth by default), learning curves, the early-stopped
trials. ``pipeline report --sweep NAME`` writes them as PNG files and a Markdown summary;
``notebooks/review_sweep.ipynb`` shows the same figures from these functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from . import tracking


def load_sweep(uri: str, experiment: str, sweep: str) -> dict[str, Any]:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise FileNotFoundError(f"no MLflow experiment '{experiment}' at {tracking.redact(uri)}")
    found = c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{sweep}'", max_results=1
    )
    if not found or found[0].data.tags.get("pipeline.kind") != "sweep":
        raise FileNotFoundError(f"no sweep named '{sweep}' in experiment '{experiment}'")
    return sweep_of(uri, found[0])


def sweep_of(uri: str, parent: Any) -> dict[str, Any]:
    """A sweep's record from its MLflow parent run: trials ranked, curves, the search space."""
    c = tracking.client(uri)
    metric = parent.data.params.get("tune.metric", "val_bleu")
    mode = parent.data.params.get("tune.mode", "max")
    rows = summarize(uri, parent.info.run_id, metric, mode)
    curves = {
        r["run_name"]: [
            (m.step, m.value) for m in sorted(c.get_metric_history(r["run_id"], metric), key=lambda m: m.step)
        ]
        for r in rows
    }
    return {
        "parent": parent,
        "metric": metric,
        "mode": mode,
        "rows": rows,
        "curves": curves,
        "space": json.loads(parent.data.params.get("tune.space", "{}")),
    }


def heatmap(sweep: dict[str, Any], x: str = "model.hidden_size", y: str = "model.num_layers"):
    """Best metric per (x, y) cell; the best trial of a cell when others share it."""
    rows, metric = sweep["rows"], sweep["metric"]
    xs = sorted({r["params"].get(x) for r in rows}, key=_axis_order)
    ys = sorted({r["params"].get(y) for r in rows}, key=_axis_order)
    grid = [[float("nan")] * len(xs) for _ in ys]
    for r in rows:
        i, j = ys.index(r["params"].get(y)), xs.index(r["params"].get(x))
        cur = grid[i][j]
        if cur != cur or (r["best"] > cur if sweep["mode"] == "max" else r["best"] < cur):
            grid[i][j] = r["best"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.3 * len(xs)), 1.4 + 1.0 * len(ys)))
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if grid[i][j] == grid[i][j]:
                ax.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", color="white", fontsize=10)
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"best {metric} per cell")  # the axes name the keys
    fig.tight_layout()
    return fig


def learning_curves(sweep: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(7, 4))
    stopped = {r["run_name"] for r in sweep["rows"] if r["early_stopped"]}
    for name, points in sweep["curves"].items():
        if points:
            steps, values = zip(*points)
            ax.plot(
                steps,
                values,
                marker="o",
                linestyle="--" if name in stopped else "-",
                label=name + (" (stopped early)" if name in stopped else ""),
            )
    ax.set_xlabel("step")
    ax.set_ylabel(sweep["metric"])
    ax.set_title("validation curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def markdown(sweep: dict[str, Any]) -> str:
    rows, metric = sweep["rows"], sweep["metric"]
    keys = list(rows[0]["params"]) if rows else []
    out = [
        f"# Sweep {sweep['parent'].data.tags.get(tracking.RUN_NAME_TAG)}",
        "",
        f"{len(rows)} trials, search space `{json.dumps(sweep['space'])}`, ranked by {metric} ({sweep['mode']}).",
        "",
        "| rank | " + " | ".join(keys) + f" | {metric} | validations | status |",
        "|" + " --- |" * (len(keys) + 4),
    ]
    for i, r in enumerate(rows, 1):
        status = "stopped early" if r["early_stopped"] else r["status"].lower()
        out.append(
            f"| {i} | "
            + " | ".join(str(r["params"][k]) for k in keys)
            + f" | {r['best']:.2f} | {r['validations']} | {status} |"
        )
    if rows:
        out += ["", f"Best: `{rows[0]['run_name']}` (MLflow run `{rows[0]['run_id']}`)."]
    return "\n".join(out) + "\n"


def _axis_order(value: Any) -> tuple[int, Any]:
    """Numbers in numeric order (96 before 128), then anything else as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def figures(sweep: dict[str, Any]) -> dict[str, Any]:
    """The report's figures by file name: the heatmap over hidden size x depth (else the first
    two searched keys) and the learning curves. The caller closes them."""
    keys = list(sweep["space"])
    x, y = (
        ("model.hidden_size", "model.num_layers")
        if {"model.hidden_size", "model.num_layers"} <= set(keys)
        else ((keys + keys)[:2] if keys else ("model.hidden_size", "model.num_layers"))
    )
    return {"heatmap.png": heatmap(sweep, x, y), "learning_curves.png": learning_curves(sweep)}


def write_report(uri: str, experiment: str, sweep_name: str, out_dir: str) -> list[Path]:
    sweep = load_sweep(uri, experiment, sweep_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(sweep).items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    (out / "summary.md").write_text(markdown(sweep))
    paths.append(out / "summary.md")
    return paths


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI when the store is a tracking server, else the run id."""
    if uri.startswith(("http://", "https://")):
        return f"{tracking.redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return run_id


def trial_links(uri: str, sweep: dict[str, Any]) -> list[dict[str, str]]:
    """Each trial (best first) and the parent with its link (:func:`run_link`)."""
    exp = sweep["parent"].info.experiment_id
    parent = sweep["parent"]
    return [
        {"run": parent.data.tags.get(tracking.RUN_NAME_TAG, ""), "link": run_link(uri, exp, parent.info.run_id)}
    ] + [{"run": r["run_name"], "link": run_link(uri, exp, r["run_id"])} for r in sweep["rows"]]


def is_video(sweep: dict[str, Any]) -> bool:
    from .config import VIDEO_DATA

    return sweep["parent"].data.params.get("data.name") in VIDEO_DATA


def best_trial(uri: str, sweep: dict[str, Any]) -> dict[str, Any]:
    """The tested best trial: its run id and name, test metrics and the test samples it logged
    (translations, or captions of a video sweep) as columns."""
    import tempfile

    c = tracking.client(uri)
    run_id = sweep["parent"].data.tags.get("best_trial_run_id") or sweep["rows"][0]["run_id"]
    run = c.get_run(run_id)
    samples_file = "samples/test_captions.json" if is_video(sweep) else "samples/test_translations.json"
    with tempfile.TemporaryDirectory(prefix="pipeline-report-") as tmp:
        with open(c.download_artifacts(run_id, samples_file, tmp)) as f:
            table = json.load(f)
    return {
        "run_id": run_id,
        "run_name": run.data.tags.get(tracking.RUN_NAME_TAG, run.info.run_name),
        "test_metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("test_")},
        "samples": {k: [row[i] for row in table["data"]] for i, k in enumerate(table["columns"])},
    }


def contact_sheet(items: list[dict[str, Any]], path: str, max_frames: int = 6) -> str:
    """Clips as strips of frames, each titled with the predicted caption and the references.
    ``items``: {"video_id", "frames" (K, H, W, 3) uint8 or None, "hyp", "refs"}."""
    import textwrap

    import numpy as np

    n = max(1, len(items))
    fig, axes = plt.subplots(n, 1, figsize=(12, 2.6 * n), squeeze=False)
    for ax, item in zip(axes[:, 0], items):
        ax.axis("off")
        frames = item["frames"]
        if frames is not None:
            picks = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).astype(int)
            gap = np.full((frames.shape[1], max(2, frames.shape[2] // 16), 3), 255, dtype=np.uint8)
            strip = np.concatenate([x for i in picks for x in (frames[i], gap)][:-1], axis=1)
            ax.imshow(strip)
        refs = "; ".join(item["refs"][:3])
        ax.set_title(
            "\n".join(
                textwrap.wrap(f"{item['video_id']}  predicted: {item['hyp']}", 120)
                + textwrap.wrap(f"references: {refs}", 120)
            ),
            loc="left",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def summarize(
    uri: str, parent_id: str, metric: str, mode: str, failed: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Child runs of a sweep, ranked by the best value of ``metric``. Children still
    RUNNING once Tune is done either failed (``failed``: run name -> error) or were
    stopped by the scheduler: close them as FAILED, or as KILLED with the early-stop tag."""
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    children = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000
    )
    space_keys = list(json.loads(parent.data.params.get("tune.space", "{}")))
    rows = []
    for ch in children:
        rid = ch.info.run_id
        name = ch.data.tags.get(tracking.RUN_NAME_TAG, ch.info.run_name)
        if ch.info.status == "RUNNING" and failed is not None:
            if name in failed:
                c.set_terminated(rid, "FAILED")
            elif ch.data.metrics.get("epoch", 0) >= int(ch.data.params.get("train.max_epochs", 0)):
                c.set_terminated(rid, "FINISHED")  # Tune stopped it at max_t, after its last epoch
            else:
                c.set_tag(rid, EARLY_STOPPED_TAG, "true")
                c.set_terminated(rid, "KILLED")
            ch = c.get_run(rid)
        history = [m.value for m in c.get_metric_history(rid, metric)]
        if not history:
            continue
        rows.append(
            {
                "run_name": name,
                "run_id": rid,
                "params": {k: _typed(ch.data.params.get(k)) for k in space_keys},
                "best": max(history) if mode == "max" else min(history),
                "validations": len(history),
                "status": ch.info.status,
                "early_stopped": ch.data.tags.get(EARLY_STOPPED_TAG) == "true",
            }
        )
    rows.sort(key=lambda r: r["best"], reverse=mode == "max")
    return rows


EARLY_STOPPED_TAG = "tune.early_stopped"


def _typed(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return text
