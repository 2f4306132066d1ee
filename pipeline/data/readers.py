"""Parallel-text readers: list input files (local paths or fsspec URIs) as read tasks, and
stream each task's rows as column batches.

A *task* is one unit of parallel reading: a pair of aligned files (Multi30k layout or
shard pairs) or one table file (TSV, JSONL, Parquet). Ray Data runs one task per block,
so shards are read in parallel and never pass through the driver.

Rows carry ``src``, ``tgt``, ``split`` ("" = assign later), ``id`` (file index << 32 |
line number, stable across runs) and ``reason`` ("" = good; else why it is dropped).
A malformed row raises :class:`DataError` naming the file and line unless
``on_bad_rows == "skip"``, in which case it is kept with its reason so it is counted.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec

CHUNK = 8192  # rows per yielded batch


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


def absolute(path: str) -> str:
    """Local paths made absolute: read tasks run in other processes (and directories)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def expand(patterns: str) -> list[str]:
    """Comma-separated globs -> sorted file list; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in [absolute(p.strip()) for p in patterns.split(",") if p.strip()]:
        fs, _ = fsspec.core.url_to_fs(pattern)
        matched = (
            sorted(fs.glob(pattern))
            if any(ch in pattern for ch in "*?[")
            else ([pattern] if fs.exists(pattern) else [])
        )
        if not matched:
            raise DataError(f"no input files match '{pattern}'")
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        files += [m if (not protocol or m.startswith(protocol)) else protocol + m for m in matched]
    return files


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


# Corpora read from data.root; the demo ones are generated there when it is missing, and
# the others (pairs, table, video_features) are named by globs.
READ_FROM_ROOT = ("multi30k", "msrvtt", "msvd")


def check_root(cfg: Any) -> None:
    """The data.root of a corpus read from one exists."""
    if cfg.name in READ_FROM_ROOT + ("demo_text", "demo_video") and not _exists(absolute(cfg.root)):
        raise DataError(f"data.root '{cfg.root}' does not exist")


def check_before_ray(cfg: Any) -> None:
    """What can be said about the input before Ray starts: a mistyped data.root at once, not
    after the seconds of a cluster's start-up (a demo corpus's root is made, not checked)."""
    if cfg.name in READ_FROM_ROOT:
        check_root(cfg)


def list_tasks(cfg: Any) -> list[dict[str, Any]]:
    """Read tasks for a DataConfig. Each: {kind, src_path, tgt_path, split, file_index}."""
    tasks: list[dict[str, Any]] = []
    if cfg.name in ("multi30k", "demo_text"):
        check_root(cfg)
        root = absolute(cfg.root)
        splits = [("train", cfg.train_split), ("val", cfg.val_split), ("test", cfg.test_split)]
        for split, prefix in splits:
            if not prefix:
                continue
            pair = []
            for lang in (cfg.src_lang, cfg.tgt_lang):
                base = f"{root.rstrip('/')}/{prefix}.{lang}"
                found = [p for p in (base + ".gz", base) if _exists(p)]
                if not found:
                    raise DataError(
                        f"missing file {base}[.gz] (data.root={cfg.root}, split '{prefix}', language '{lang}')"
                    )
                pair.append(found[0])
            tasks.append({"kind": "pair", "src_path": pair[0], "tgt_path": pair[1], "split": split})
    elif cfg.name == "pairs":
        src, tgt = expand(cfg.src_files), expand(cfg.tgt_files)
        if len(src) != len(tgt):
            raise DataError(
                f"data.src_files matches {len(src)} files but data.tgt_files matches {len(tgt)}; they must pair up one to one"
            )
        tasks = [{"kind": "pair", "src_path": s, "tgt_path": t, "split": ""} for s, t in zip(src, tgt)]
    elif cfg.name == "table":
        tasks = [{"kind": "table", "src_path": f, "tgt_path": "", "split": ""} for f in expand(cfg.files)]
    else:
        raise DataError(f"data.name '{cfg.name}' has no text reader")
    for i, t in enumerate(tasks):
        t["file_index"] = i
    return tasks


def _open(path: str):
    return fsspec.open(path, "rb", compression="gzip" if path.endswith(".gz") else None)


def _lines(path: str) -> Iterator[bytes]:
    """Raw lines without their line ending."""
    for chunk in _line_chunks(path):
        for raw in chunk:
            yield raw.rstrip(b"\r\n")


def _decode(raw: bytes, path: str, line: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from e
    return text[1:] if line == 1 and text.startswith("\ufeff") else text


class _Rows:
    """Accumulates rows and flushes column batches of CHUNK rows."""

    def __init__(self, split: str, file_index: int):
        self.split, self.base = split, file_index << 32
        self.cols: dict[str, list] = {k: [] for k in ("src", "tgt", "split", "id", "reason")}

    def add(self, line: int, src: str, tgt: str, reason: str = "") -> None:
        c = self.cols
        c["src"].append(src)
        c["tgt"].append(tgt)
        c["split"].append(self.split)
        c["id"].append(self.base | line)
        c["reason"].append(reason)

    def full(self) -> bool:
        return len(self.cols["src"]) >= CHUNK

    def flush(self) -> dict[str, list]:
        out, self.cols = self.cols, {k: [] for k in self.cols}
        return out


def _bad(skip: bool, err: DataError, rows: _Rows, line: int, reason: str) -> None:
    if not skip:
        raise err
    rows.add(line, "", "", reason)


def _line_chunks(path: str) -> Iterator[list[bytes]]:
    """Raw lines, endings included, in lists of up to CHUNK; a truncated gzip is reported by
    file name."""
    try:
        with _open(path) as f:
            lines = io.BufferedReader(f, 1 << 20) if path.endswith(".gz") else f  # C line splitting
            while chunk := list(itertools.islice(lines, CHUNK)):
                yield chunk
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e}); is the file truncated or not gzip?") from e


def _decode_chunk(raw: list[bytes], path: str, first: int, skip: bool) -> tuple[list[str], list[int]]:
    """A chunk's lines as text without line endings (one decode for the chunk, as
    ``_decode`` line by line would give) and the indices of lines that are not UTF-8, which
    raise unless skipped."""
    try:
        text = b"".join(raw).decode("utf-8")
    except UnicodeDecodeError:
        texts, bad = [], []
        for i, line in enumerate(raw):
            try:
                texts.append(_decode(line.rstrip(b"\r\n"), path, first + i))
            except DataError:
                if not skip:
                    raise
                texts.append("")
                bad.append(i)
        return texts, bad
    texts = text.split("\n")[: len(raw)]  # binary lines end at b"\n" only, so this splits as they did
    if "\r" in text:
        texts = [t.rstrip("\r") for t in texts]
    if first == 1 and texts and texts[0].startswith("\ufeff"):
        texts[0] = texts[0][1:]
    return texts, []


def read_pair(task: dict[str, Any], skip: bool) -> Iterator[dict[str, list]]:
    """Aligned line pairs, CHUNK at a time, each chunk decoded in one call."""
    src_path, tgt_path = task["src_path"], task["tgt_path"]
    base = task["file_index"] << 32
    n_src = n_tgt = 0
    for s, t in itertools.zip_longest(_line_chunks(src_path), _line_chunks(tgt_path), fillvalue=[]):
        if len(s) != len(t) or n_src != n_tgt:  # misaligned: count the rest of both for the error below
            n_src, n_tgt = n_src + len(s), n_tgt + len(t)
            continue
        src, src_bad = _decode_chunk(s, src_path, n_src + 1, skip)
        tgt, tgt_bad = _decode_chunk(t, tgt_path, n_tgt + 1, skip)
        reason = [""] * len(s)
        for i in src_bad + tgt_bad:
            src[i] = tgt[i] = ""
            reason[i] = "invalid_utf8"
        yield {
            "src": src,
            "tgt": tgt,
            "split": [task["split"]] * len(s),
            "id": list(range(base | (n_src + 1), base | (n_src + len(s) + 1))),
            "reason": reason,
        }
        n_src, n_tgt = n_src + len(s), n_tgt + len(t)
    if n_src != n_tgt:
        # Misalignment shifts every later pair; no row can be trusted, so never skip it.
        raise DataError(f"misaligned parallel files: {src_path} has {n_src} lines but {tgt_path} has {n_tgt} lines")


def _table_format(path: str) -> str:
    name = path.removesuffix(".gz")
    for ext in ("tsv", "jsonl", "json", "parquet"):
        if name.endswith("." + ext):
            return "jsonl" if ext == "json" else ext
    raise DataError(f"{path}: unknown table format (expected .tsv, .jsonl or .parquet, optionally .gz)")


def read_table(task: dict[str, Any], src_col: str, tgt_col: str, skip: bool) -> Iterator[dict[str, list]]:
    path = task["src_path"]
    rows = _Rows(task["split"], task["file_index"])
    fmt = _table_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in (src_col, tgt_col) if c not in names]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {missing}; the file has {names} (set data.src_column / data.tgt_column)"
                )
            line = 0
            for batch in pf.iter_batches(columns=[src_col, tgt_col], batch_size=CHUNK):
                for s, t in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    line += 1
                    if isinstance(s, str) and isinstance(t, str):
                        rows.add(line, s, t)
                    else:
                        _bad(
                            skip,
                            DataError(f"{path}: row {line}: {src_col}/{tgt_col} must be strings, got {s!r}, {t!r}"),
                            rows,
                            line,
                            "malformed",
                        )
                yield rows.flush()
        return
    src_idx = tgt_idx = None
    header, width = False, 2  # a TSV's fields per line: the header's, else exactly source and target
    for line, raw in enumerate(_lines(path), start=1):
        try:
            text = _decode(raw, path, line)
        except DataError as e:
            _bad(skip, e, rows, line, "invalid_utf8")
            continue
        if fmt == "tsv":
            fields = text.split("\t")
            if line == 1 and src_idx is None:
                # A header row names the columns; without one, columns 0 and 1 are used.
                if src_col in fields and tgt_col in fields:
                    src_idx, tgt_idx = fields.index(src_col), fields.index(tgt_col)
                    header, width = True, len(fields)
                    continue
                src_idx, tgt_idx = 0, 1
                header, width = False, 2
            if len(fields) <= max(src_idx, tgt_idx):
                _bad(
                    skip,
                    DataError(
                        f"{path}:{line}: expected at least {max(src_idx, tgt_idx) + 1} tab-separated fields, got {len(fields)}"
                    ),
                    rows,
                    line,
                    "malformed",
                )
                continue
            if len(fields) > width:
                # A tab inside a sentence: which fields are which is unknown, so never guess.
                _bad(
                    skip,
                    DataError(
                        f"{path}:{line}: expected {width} tab-separated fields "
                        f"({'as the header has' if header else 'no header: source, target'}), got "
                        f"{len(fields)}; a tab inside a field?"
                    ),
                    rows,
                    line,
                    "too_many_fields",
                )
                continue
            rows.add(line, fields[src_idx], fields[tgt_idx])
        else:
            if not text.strip():
                rows.add(line, "", "")  # counted as empty by the cleaner
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                _bad(skip, DataError(f"{path}:{line}: malformed JSON ({e.msg})"), rows, line, "malformed")
                continue
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get(src_col), str)
                or not isinstance(obj.get(tgt_col), str)
            ):
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                _bad(
                    skip,
                    DataError(f"{path}:{line}: expected string fields '{src_col}' and '{tgt_col}', got {keys}"),
                    rows,
                    line,
                    "malformed",
                )
                continue
            rows.add(line, obj[src_col], obj[tgt_col])
        if rows.full():
            yield rows.flush()
    yield rows.flush()


def read_tasks(batch: dict[str, Any], src_column: str, tgt_column: str, on_bad_rows: str) -> Iterator[dict[str, list]]:
    """Ray Data UDF: a batch of read tasks -> a stream of row batches."""
    skip = on_bad_rows == "skip"
    for i in range(len(batch["kind"])):
        task = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        if task["kind"] == "pair":
            yield from read_pair(task, skip)
        else:
            yield from read_table(task, src_column, tgt_column, skip)
