"""Preprocessing outputs (text and video alike): built whole in a staging folder, made visible
complete, one builder at a time, and demo corpora generated only into folders they own.

A build writes its shards and tokenizers into ``{out}.staging-{uuid}``; ``publish`` then
writes ``manifest.json`` (atomically: a temporary name, then a rename) and makes the folder
visible under ``out``. On a local path that is one ``os.rename`` of the staging folder (an
old complete output, under ``--force``, is renamed aside first and removed after); on an
object store the files are copied and the manifest is written last. The manifest marks a
complete output: ``read_manifest`` trusts a folder only when its manifest is there, parses
and names this very output, so a folder cut short is never reused.

``reuse_or_build`` holds ``{out}.lock`` (a :class:`pipeline.lock.StorageLock`) around the
reuse-or-build step, so two ``pipeline preprocess`` of the same output never interleave:
the second waits, then reuses what the first built. Staging folders left by a crashed run
are removed by the next build (under the lock nobody else is writing one).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import pyarrow as pa
from ray.data.datasource import Datasink

from ..config import DataConfig, config_hash
from ..lock import StorageLock, describe
from ..tracking import redact
from . import tokenizer as toklib
from .readers import DataError


class Preprocessed(NamedTuple):
    """A preprocessing run's result: the output folder (local path or URI) and its manifest
    (counts read, kept and dropped per reason and split; tokenizers; for video the input)."""

    folder: str
    manifest: dict[str, Any]


MANIFEST = "manifest.json"
DEMO_MARKER = ".pipeline-demo"  # written by the demo generators in the folders they create


def _local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _name(out: str) -> str:
    return out.rstrip("/").rsplit("/", 1)[-1]


def read_manifest(out: str) -> dict[str, Any] | None:
    """The manifest of a complete output at ``out``, else None (absent, damaged, or written
    for another output, e.g. by a version that did not mark its outputs)."""
    fs, p = fsspec.core.url_to_fs(f"{out.rstrip('/')}/{MANIFEST}")
    try:
        with fs.open(p, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # half a file: not complete
    if not isinstance(manifest, dict) or manifest.get("output") != _name(out):
        return None
    return manifest


def _write_json_atomic(path: str, obj: Any) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    if _local(path):
        os.replace(tmp, p)
    else:  # an object store's put is all-or-nothing already; the move keeps one code path
        fs.mv(tmp, p)


def staging_dir(out: str) -> str:
    return f"{out.rstrip('/')}.staging-{uuid.uuid4().hex[:12]}"


def remove_leftovers(out: str) -> list[str]:
    """Staging (and set-aside) folders of ``out`` left by an interrupted run; call under the lock."""
    fs, root = fsspec.core.url_to_fs(out.rstrip("/"))
    found = [p for pattern in (f"{root}.staging-*", f"{root}.old-*") for p in fs.glob(pattern)]
    for p in found:
        fs.rm(p, recursive=True)
    return found


def publish(staging: str, out: str, manifest: dict[str, Any]) -> None:
    """Make the complete staging folder visible as ``out``, the manifest last."""
    manifest = {**manifest, "output": _name(out)}
    fs, root = fsspec.core.url_to_fs(out.rstrip("/"))
    _, stage = fsspec.core.url_to_fs(staging)
    if _local(out):
        _write_json_atomic(f"{stage}/{MANIFEST}", manifest)
        os.makedirs(os.path.dirname(root), exist_ok=True)
        aside = None
        if os.path.exists(root):
            # rename() will not replace a non-empty folder. Between the two renames `out` is
            # absent: a reader then finds no manifest and, like any builder, waits on the lock
            # we hold, so it reuses the new output rather than seeing a mix of old and new.
            aside = f"{root}.old-{uuid.uuid4().hex[:12]}"
            os.rename(root, aside)
        os.rename(stage, root)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
        return
    if fs.exists(root):  # the manifest goes first, so the old folder reads as incomplete from now on
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.rm(f"{root}/{MANIFEST}")
        fs.rm(root, recursive=True)
    for f in sorted(fs.find(stage)):
        fs.makedirs(os.path.dirname(f"{root}/{f[len(stage) + 1 :]}"), exist_ok=True)
        fs.copy(f, f"{root}/{f[len(stage) + 1 :]}")
    _write_json_atomic(f"{out.rstrip('/')}/{MANIFEST}", manifest)
    fs.rm(stage, recursive=True)


def reuse_or_build(out: str, force: bool, build: Callable[[str], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(manifest, built): the complete output at ``out``, or ``build(staging)``'s, published.

    ``build`` writes shards and tokenizers under the staging folder it is given and returns
    the manifest. Only one process at a time builds an output; others wait for it."""
    manifest = None if force else read_manifest(out)
    if manifest is not None:
        return manifest, False
    lock = StorageLock(f"{out.rstrip('/')}.lock", what=f"pipeline preprocess -> {redact(out)}")
    lock.acquire(
        wait=True,
        on_wait=lambda info: print(
            f"[preprocess] waiting for {redact(out)}: another preprocess is building it ({describe(info) if info else 'lock unreadable'})",
            flush=True,
        ),
    )
    try:
        if not force:  # the holder we waited for has built it
            manifest = read_manifest(out)
            if manifest is not None:
                return manifest, False
        for p in remove_leftovers(out):
            print(f"[preprocess] removed {redact(p)}, left by an interrupted run", flush=True)
        staging = staging_dir(out)
        try:
            manifest = build(staging)
            publish(staging, out, manifest)
        except BaseException:
            fs, p = fsspec.core.url_to_fs(staging)
            try:
                if fs.exists(p):
                    fs.rm(p, recursive=True)
            except OSError:
                pass  # the next build removes it
            raise
        return {**manifest, "output": _name(out)}, True
    finally:
        lock.release()


# ---------------------------------------------------------------- demo corpora


def demo_folder(
    root: str,
    complete: Callable[[], bool],
    generate: Callable[[], None],
    what: str,
    params: dict[str, Any],
    refuse: str = "",
) -> None:
    """Generate a demo corpus into ``root`` unless it is already there as ``params`` ask, and
    only into a folder the generators own: absent, empty, or holding the marker they write.

    The marker records the generator's ``params`` (sizes, seed, languages): a folder the
    generator made with other params is generated again, never reused for a run that asked
    for another corpus. ``complete()`` says whether the corpus files are all there in a
    folder without a marker (then nothing is written: a user's files in the demo layout);
    ``refuse`` is a reason not to generate at all (the config names a user's files)."""
    marker = f"{root.rstrip('/')}/{DEMO_MARKER}"
    fs, p = fsspec.core.url_to_fs(root)

    def found() -> dict[str, Any] | None:
        """The marker's contents ({} when unreadable), or None without a marker."""
        if not fs.exists(f"{p}/{DEMO_MARKER}"):
            return None
        try:
            got = json.loads(fs.cat_file(f"{p}/{DEMO_MARKER}"))
        except (OSError, ValueError):
            return {}
        return got if isinstance(got, dict) else {}

    def done() -> bool:
        mark = found()
        if mark is None:
            return complete()
        return mark.get("complete") is True and mark.get("params") == params

    if done():
        return
    if refuse:
        raise DataError(f"{what}: not generating a demo corpus into {redact(root)}: {refuse}")
    with StorageLock(f"{root.rstrip('/')}.lock", what=f"generating {what} in {redact(root)}").acquire(
        wait=True,
        on_wait=lambda info: print(
            f"[preprocess] waiting for {redact(root)}: {describe(info) if info else ''}", flush=True
        ),
    ):
        if done():  # generated by the process we waited for
            return
        if fs.exists(p):
            entries = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))
            others = [e for e in entries if e != DEMO_MARKER]
            if others and DEMO_MARKER not in entries:
                shown = ", ".join(others[:5]) + (f", ... ({len(others)} entries)" if len(others) > 5 else "")
                raise DataError(
                    f"{what}: {root} is not empty ({shown}) and was not made by the demo generator "
                    f"(no {DEMO_MARKER}); refusing to write generated files into it. Point data.root at an "
                    "empty or new folder, or use the reader for your corpus"
                )
            mark = found() or {}
            if others and mark.get("complete") is True:
                had = mark.get("params")
                changed = (
                    ", ".join(f"{k} {had.get(k)} -> {v}" for k, v in params.items() if had.get(k) != v)
                    if isinstance(had, dict)
                    else "made before the generator recorded its settings"
                )
                print(
                    f"[preprocess] {redact(root)} holds another {what} corpus ({changed}): generating it again",
                    flush=True,
                )
            for e in others:  # the folder is the generator's: none of its old files outlives the new corpus
                fs.rm(f"{p}/{e}", recursive=True)
        fs.makedirs(p, exist_ok=True)

        def mark(complete: bool) -> None:
            _write_json_atomic(marker, {"generator": what, "params": params, "complete": complete})

        mark(False)  # a crash from here leaves the folder ours
        generate()
        mark(True)


SPLITS = ("train", "val", "test")


def write_split_shards(out: str, table: pa.Table, columns: list[str]) -> None:
    """The kept rows (reason "") of a block, one Parquet file per split under ``out/{split}/``.

    A file is named by the smallest id among its rows (ids are unique among kept rows), so a
    retried task rewrites the same files instead of adding copies."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(out)
    for split in SPLITS:
        kept = table.filter(pc.and_(pc.equal(table["reason"], ""), pc.equal(table["split"], split)))
        if kept.num_rows:
            first = int(pc.min(kept["id"]).as_py())
            with fs.open(f"{root}/{split}/part-{first:020d}.parquet", "wb") as f:
                pq.write_table(kept.select(columns), f)


def output_dir(cfg: DataConfig, inputs: list[dict[str, Any]]) -> str:
    keyed = {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "feature_cache")}
    h = config_hash({"config": keyed, "inputs": inputs})
    # Absolute: Ray workers read it from other working directories (and other nodes).
    base = cfg.output_dir if "://" in cfg.output_dir else str(Path(cfg.output_dir).expanduser().resolve())
    return f"{base.rstrip('/')}/{cfg.name}-{cfg.src_lang}-{cfg.tgt_lang}-{h}"


def read_split(
    split_dir: str, columns: list[str] | None = None, max_rows: int | None = None, filters: list[tuple] | None = None
) -> pa.Table | None:
    """A split's Parquet shards as one table of ``columns`` (None: all; only their pages are read), in
    this process: a Ray Data read of a split this small costs seconds of task start-up for
    milliseconds of reading. None if the split has more than ``max_rows`` rows (the footers
    say, before any data is read). ``filters``: pyarrow's, applied as each shard is read."""
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(split_dir)
    files = sorted(f for f in fs.find(root) if f.endswith(".parquet"))
    if max_rows is not None:
        rows = 0
        for f in files:
            with fs.open(f, "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
            if rows > max_rows:
                return None
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns, filters=filters))
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.int32()) for c in columns or []})


def read_column(split_dir: str, column: str) -> pa.ChunkedArray:
    """One column of a split's Parquet shards."""
    return read_split(split_dir, [column]).column(column)


def read_tokenizers(out: str) -> tuple[str, str]:
    texts = []
    for side in ("src", "tgt"):
        with fsspec.open(f"{out}/{side}_tokenizer.json", "r") as f:
            texts.append(f.read())
    return texts[0], texts[1]


def tokenizer_info(cfg: DataConfig, src_json: str, tgt_json: str) -> dict[str, Any]:
    src_tok, tgt_tok = toklib.load_tokenizer(src_json), toklib.load_tokenizer(tgt_json)
    return {
        "kind": cfg.tokenizer,
        "joint_vocab": cfg.joint_vocab,
        "src_vocab_size": src_tok.get_vocab_size(),
        "tgt_vocab_size": tgt_tok.get_vocab_size(),
        "src_sha256": config_hash(src_json),
        "tgt_sha256": config_hash(tgt_json),
        "pad_id": toklib.PAD_ID,
        "bos_id": toklib.BOS_ID,
        "eos_id": toklib.EOS_ID,
    }


def write_tokenizers(out: str, src_json: str, tgt_json: str) -> None:
    for side, text in (("src", src_json), ("tgt", tgt_json)):
        with fsspec.open(f"{out}/{side}_tokenizer.json", "w") as f:
            f.write(text)


def check_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The splits a run needs are not empty (else the output is not published)."""
    for split in ("train", "val"):
        if not manifest["splits"][split]["kept"]:
            raise DataError(
                f"the {split} split is empty after preprocessing ({manifest['splits'][split]}); "
                "check data.*_split / data.val_fraction and the filters"
            )
    return manifest


def report_done(out: str, manifest: dict[str, Any]) -> None:
    print(
        f"[preprocess] built {redact(out)} in {manifest['seconds']}s: read {manifest['rows_read']}, kept "
        f"{manifest['rows_kept']}, dropped {manifest['dropped'] or 0}",
        flush=True,
    )


class SplitSink(Datasink):
    """Writes each block's kept rows to ``{out}/{split}/`` and returns its counts per (split,
    reason): one streaming pass gives both the shards and the manifest's numbers. ``out`` is
    a fresh staging folder (see ``output.py``), so nothing of an earlier run is in it."""

    def __init__(self, out: str, columns: list[str] | None = None):
        self.out, self.columns = out, columns or []
        self.counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}  # split -> reason ("kept") -> rows

    def on_write_start(self, schema: Any = None) -> None:
        fs, root = fsspec.core.url_to_fs(self.out)
        for split in SPLITS:
            fs.makedirs(f"{root}/{split}", exist_ok=True)

    def write(self, blocks: Any, ctx: Any) -> Counter:
        from ray.data.block import BlockAccessor

        counts: Counter = Counter()  # (split, reason or "kept") -> rows
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if not table.num_rows:
                continue
            for row in table.group_by(["split", "reason"]).aggregate([([], "count_all")]).to_pylist():
                counts[row["split"], row["reason"] or "kept"] += row["count_all"]
            write_split_shards(self.out, table, self.columns)
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        for (split, reason), n in sum(write_result.write_returns, Counter()).items():
            self.counts.setdefault(split, {})[reason] = n
