"""Ray Data preprocessing of parallel text into training-ready Parquet shards.

read (one task per file or file pair, in parallel) -> clean (Unicode normalisation,
whitespace, length in characters) -> optional exact-pair dedup -> split (from the files,
else by a hash of the pair) -> train a subword tokenizer on the training split -> encode
on an actor pool -> drop by length in tokens -> write ``{train,val,test}/*.parquet`` and
``manifest.json`` with every count (rows read = kept + dropped, per split and reason).

The output folder is keyed by a hash of the data config and the input files' sizes and
mtimes, so the same inputs and config reuse it. It is built in a staging folder and made
visible complete, one builder at a time (``output.py``, shared with video).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import ray

from ..config import DataConfig, config_hash
from ..tracking import redact  # printed lines and the manifest: paths may be URIs with credentials
from . import tokenizer as toklib
from .output import (
    SPLITS,
    Preprocessed,
    SplitSink,
    check_manifest,
    demo_folder,
    output_dir,
    report_done,
    reuse_or_build,
    tokenizer_info,
    write_tokenizers,
)
from .readers import DataError, absolute, list_tasks, read_tasks

OUTPUT_COLUMNS = ["id", "src_ids", "tgt_ids", "src_len", "tgt_len", "src", "tgt"]


def _clean(rows: dict[str, list], cfg: dict[str, Any]) -> pa.Table:
    """Normalise and filter by characters; assign a split where the files gave none."""
    src = toklib.clean_texts(rows["src"], cfg["normalization"], cfg["lowercase"])
    tgt = toklib.clean_texts(rows["tgt"], cfg["normalization"], cfg["lowercase"])
    src_chars = np.fromiter(map(len, src), np.int64, len(src))
    tgt_chars = np.fromiter(map(len, tgt), np.int64, len(tgt))
    reason = np.array(rows["reason"], dtype=object)
    good = reason == ""
    empty = (src_chars == 0) | (tgt_chars == 0)
    reason[good & empty] = "empty"
    reason[good & ~empty & (np.maximum(src_chars, tgt_chars) > cfg["max_chars"])] = "too_long_chars"
    split = np.array(rows["split"], dtype=object)
    unsplit = np.flatnonzero(split == "")
    if len(unsplit):
        # Deterministic split by content: the same pair lands in the same split on every
        # run and every worker, with no global pass.
        u = np.array([zlib.crc32(f"{src[i]}\t{tgt[i]}".encode()) for i in unsplit], np.float64) / 2**32
        test, val = cfg["test_fraction"], cfg["test_fraction"] + cfg["val_fraction"]
        split[unsplit] = np.where(u < test, "test", np.where(u < val, "val", "train"))
    return pa.table(
        {
            "src": pa.array(src, pa.string()),
            "tgt": pa.array(tgt, pa.string()),
            "id": pa.array(rows["id"], pa.int64()),
            "split": pa.array(split, pa.string()),
            "reason": pa.array(reason, pa.string()),
        }
    )


def _read_and_clean(
    batch: dict[str, np.ndarray], src_column: str, tgt_column: str, on_bad_rows: str, cfg: dict[str, Any]
) -> Iterator[pa.Table]:
    """Ray Data UDF: read tasks -> cleaned Arrow tables, one per chunk of rows."""
    for rows in read_tasks(batch, src_column, tgt_column, on_bad_rows):
        yield _clean(rows, cfg)


def _first_of_group(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(group["id"], kind="stable")  # keep the earliest occurrence
    keep = order[:1]
    out = {k: v[keep] for k, v in group.items()}
    dups = len(order) - 1
    if dups:  # the others stay as rows, marked, so they are counted
        rest = {k: v[order[1:]] for k, v in group.items()}
        rest["reason"] = np.array(["duplicate"] * dups, dtype=object)
        out = {k: np.concatenate([out[k], rest[k]]) for k in out}
    return out


def _dedup(ds: ray.data.Dataset) -> ray.data.Dataset:
    def key(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["pair_key"] = np.array(
            [
                f"{s}\t{t}" if not r else f"bad:{i}"
                for s, t, r, i in zip(batch["src"], batch["tgt"], batch["reason"], batch["id"])
            ],
            dtype=object,
        )
        return batch

    return (
        ds.map_batches(key, batch_format="numpy")
        .groupby("pair_key")
        .map_groups(_first_of_group, batch_format="numpy")
        .drop_columns(["pair_key"])
    )


def _encoder(json_text: str) -> toklib.WordEncoder:
    """Encoders loaded once per worker process (Ray reuses processes across tasks), so each
    keeps its word cache from one task to the next.

    The tokenizer's thread pool is sized to the CPUs Ray gave the task (set before its first
    use): Ray Data already runs one task per CPU, and a pool as wide as the machine in
    each of them only makes the tasks take turns."""
    if not _ENCODERS and ray.is_initialized() and "RAYON_NUM_THREADS" not in os.environ:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        if cpus:
            os.environ["RAYON_NUM_THREADS"] = str(max(1, int(cpus)))
    if json_text not in _ENCODERS:
        if len(_ENCODERS) >= 2:  # a source and a target tokenizer
            _ENCODERS.clear()
        _ENCODERS[json_text] = toklib.WordEncoder(toklib.load_tokenizer(json_text))
    return _ENCODERS[json_text]


_ENCODERS: dict[str, Any] = {}


def _id_lists(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    if offsets[-1] > np.iinfo(np.int32).max:  # a list<int32> column's offsets; blocks are far smaller
        raise DataError(f"a block of {len(offsets) - 1} rows has {offsets[-1]} tokens, more than one column holds")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int32()))


def encode_batch(batch: pa.Table, src_json: str, tgt_json: str, min_tokens: int, max_tokens: int) -> pa.Table:
    """Ray Data UDF: tokenize both sides and drop rows outside the token-length limits.

    A plain function, so Ray Data fuses it with the read and clean stages into one task per
    input file: rows are never moved between processes before they are written."""
    src_vals, src_off = _encoder(src_json).encode_flat(batch.column("src").to_pylist())
    tgt_vals, tgt_off = _encoder(tgt_json).encode_flat(batch.column("tgt").to_pylist())
    src_len, tgt_len = np.diff(src_off).astype(np.int32), np.diff(tgt_off).astype(np.int32)
    longest, shortest = np.maximum(src_len, tgt_len), np.minimum(src_len, tgt_len)
    reason = np.asarray(batch.column("reason").to_numpy(zero_copy_only=False), dtype=object)
    good = reason == ""
    reason[good & (longest > max_tokens)] = "too_long_tokens"
    reason[good & (longest <= max_tokens) & (shortest < min_tokens)] = "too_short_tokens"
    return (
        batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reason, type=pa.string()))
        .append_column("src_ids", _id_lists(src_vals, src_off))
        .append_column("tgt_ids", _id_lists(tgt_vals, tgt_off))
        .append_column("src_len", pa.array(src_len))
        .append_column("tgt_len", pa.array(tgt_len))
    )


def _kept_in(split: str):
    from ray.data.expressions import col

    return (col("reason") == "") & (col("split") == split)


def ensure_demo_corpus(cfg: DataConfig) -> None:
    """data=demo_text: generate the embedded corpus under data.root once, into a folder the
    generator owns (absent, empty, or marked by it): never over a user's files."""
    if cfg.name != "demo_text":
        return
    root = absolute(cfg.root)
    names = [
        f"{s}.{lang}.gz"
        for s in (cfg.train_split, cfg.val_split, cfg.test_split)
        if s
        for lang in (cfg.src_lang, cfg.tgt_lang)
    ]
    fs, p = fsspec.core.url_to_fs(root)

    n_eval = max(200, cfg.demo_size // 40)
    params = {"train_pairs": cfg.demo_size, "eval_pairs": n_eval, "seed": 1234, "files": names}

    def generate() -> None:
        from .synthetic import write_demo_text

        print(
            f"[preprocess] generating the demo corpus ({cfg.demo_size} training pairs) in {redact(cfg.root)}",
            flush=True,
        )
        write_demo_text(
            root,
            n_train=cfg.demo_size,
            n_val=n_eval,
            n_test=n_eval,
            seed=1234,
            src_lang=cfg.src_lang,
            tgt_lang=cfg.tgt_lang,
        )

    demo_folder(root, lambda: all(fs.exists(f"{p}/{n}") for n in names), generate, "data=demo_text", params)


def cleaned(cfg: DataConfig, tasks: list[dict[str, Any]]) -> ray.data.Dataset:
    """Read tasks -> rows -> cleaned rows with a split and a drop reason (lazy)."""
    clean_cfg = {
        k: getattr(cfg, k) for k in ("normalization", "lowercase", "max_chars", "val_fraction", "test_fraction")
    }
    return ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        _read_and_clean, fn_args=(cfg.src_column, cfg.tgt_column, cfg.on_bad_rows, clean_cfg), batch_size=1
    )


def encode_and_write(
    ds: ray.data.Dataset, cfg: DataConfig, src_json: str, tgt_json: str, out: str
) -> dict[str, dict[str, int]]:
    """Encode and write the kept rows of each split under ``out`` in one streaming pass;
    returns the counts per split and reason (``kept`` or why dropped)."""
    sink = SplitSink(out, OUTPUT_COLUMNS)
    # batch_size=None: whole blocks as the readers yield them. A row count here would make
    # Ray Data bundle that many *input* rows (read tasks) into one task of the fused
    # read->clean->encode->write operator, i.e. the whole corpus in one task.
    (
        ds.map_batches(
            encode_batch,
            fn_args=(src_json, tgt_json, cfg.min_tokens, cfg.max_tokens),
            batch_size=None,
            batch_format="pyarrow",
        ).write_datasink(sink)
    )
    return sink.counts


def preprocess_text(cfg: DataConfig, force: bool = False) -> Preprocessed:
    """Run (or reuse) the preprocessing of sentence pairs; returns (output folder, manifest).
    (``pipeline.tasks.preprocess`` picks this or the video one by the config.)"""
    t0 = time.time()
    ensure_demo_corpus(cfg)
    tasks = list_tasks(cfg)
    inputs = _fingerprint(tasks)
    out = output_dir(cfg, inputs)
    manifest, built = reuse_or_build(out, force, lambda staging: _build(cfg, tasks, inputs, staging, t0))
    if built:
        report_done(out, manifest)
    else:
        print(
            f"[preprocess] reusing {redact(out)} ({manifest['rows_kept']} pairs kept of {manifest['rows_read']})",
            flush=True,
        )
    return Preprocessed(out, manifest)


def _build(
    cfg: DataConfig, tasks: list[dict[str, Any]], inputs: list[dict[str, Any]], out: str, t0: float
) -> dict[str, Any]:
    """Write shards and tokenizers under ``out`` (a staging folder); returns the manifest."""
    print(f"[preprocess] {len(tasks)} read task(s) -> {redact(out)}", flush=True)
    ds = cleaned(cfg, tasks)
    if cfg.dedup:  # an all-to-all shuffle: the one case that holds the corpus in Ray's object store
        ds = _dedup(ds).materialize()

    # Tokenizer: trained on the first tokenizer_max_lines kept training pairs, streamed into
    # the trainer (which keeps word counts, not text); the stream stops reading once it has them.
    print(
        f"[preprocess] training a {cfg.tokenizer} tokenizer (vocab {cfg.vocab_size}, "
        f"{'joint' if cfg.joint_vocab else 'separate'}) on up to {cfg.tokenizer_max_lines} training pairs",
        flush=True,
    )
    train_text = ds.filter(expr=_kept_in("train")).select_columns(["src", "tgt"]).limit(cfg.tokenizer_max_lines)
    seen = [0]

    def texts(sides: tuple[str, ...]):
        for batch in train_text.iter_batches(batch_size=4096, batch_format="numpy"):
            seen[0] += len(batch["src"])
            for side in sides:
                yield from batch[side].tolist()

    if cfg.joint_vocab:
        src_json = tgt_json = toklib.train_tokenizer(texts(("src", "tgt")), cfg.tokenizer, cfg.vocab_size).to_str()
    else:
        src_json = toklib.train_tokenizer(texts(("src",)), cfg.tokenizer, cfg.vocab_size).to_str()
        tgt_json = toklib.train_tokenizer(texts(("tgt",)), cfg.tokenizer, cfg.vocab_size).to_str()
    if not seen[0]:
        raise DataError(
            f"no usable training pairs in the corpus ({', '.join(t['src_path'] for t in tasks[:3])}...): "
            "empty input, or every row was dropped by the filters"
        )

    print("[preprocess] encoding and writing shards", flush=True)
    counts = encode_and_write(ds, cfg, src_json, tgt_json, out)
    write_tokenizers(out, src_json, tgt_json)

    dropped: dict[str, int] = {}
    for per in counts.values():
        for reason, n in per.items():
            if reason != "kept":
                dropped[reason] = dropped.get(reason, 0) + n
    manifest = {
        "format": 1,
        "data_config": {k: redact(v) for k, v in asdict(cfg).items()},  # a record, on shared storage
        "config_hash": config_hash(asdict(cfg)),
        "inputs": [{**f, "path": redact(f["path"])} for f in inputs],
        "rows_read": sum(sum(per.values()) for per in counts.values()),
        "rows_kept": sum(per.get("kept", 0) for per in counts.values()),
        "dropped": dropped,
        "splits": {
            s: {"kept": counts[s].get("kept", 0), "dropped": {r: n for r, n in counts[s].items() if r != "kept"}}
            for s in SPLITS
        },
        "tokenizer": tokenizer_info(cfg, src_json, tgt_json),
        "seconds": round(time.time() - t0, 2),
    }
    return check_manifest(manifest)


def _fingerprint(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in tasks:
        for path in filter(None, (t["src_path"], t["tgt_path"])):
            fs, p = fsspec.core.url_to_fs(path)
            info = fs.info(p)
            out.append(
                {
                    "path": path,
                    "size": info.get("size"),
                    "mtime": str(info.get("mtime") or info.get("LastModified") or ""),
                }
            )
    return out
