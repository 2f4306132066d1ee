"""Preprocessing benchmark: Ray Data tokenisation vs single-process ``encode_batch``, and the
memory that preprocessing needs for a corpus and for 10x that corpus.

1. Throughput: the same gzip shard pairs (the generated demo corpus, 8 shards) are read,
   cleaned, encoded and written as Parquet (a) in one process: gzip lines -> ``clean_text``
   -> ``Tokenizer.encode_batch`` (HF tokenizers, itself multi-threaded) -> a Parquet file
   per shard, and (b) by the pipeline's own Ray Data stages, streamed: read tasks -> clean
   -> encode -> the split-writing sink. Same trained tokenizer, rows/s side by side. For
   scale, (c): the pipeline's own stage functions called in this one process, no Ray, one
   tokenizer thread, which tells how much of (b) over (a) is our code and how much Ray's
   parallelism.
2. Memory: ``pipeline preprocess`` on the corpus and on 10x the corpus (each in its own
   process and Ray cluster); the peak of the summed proportional set size (PSS) of that
   process and everything it started (Ray's GCS, raylet, workers and object store pages),
   sampled every 0.3 s, and the ratio of the two.

Prints JSON and a one-line summary.

    python bench/preprocess.py [--pairs 50000] [--shards 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

from pipeline.data import tokenizer as toklib
from pipeline.data.synthetic import generate_pairs


def write_shards(root: str, pairs: list[tuple[str, str]], shards: int) -> None:
    os.makedirs(root, exist_ok=True)
    for s in range(shards):
        part = pairs[s::shards]
        for lang, side in (("en", 0), ("de", 1)):
            with gzip.open(f"{root}/part{s:03d}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(p[side] + "\n" for p in part)


def single_process(root: str, shards: int, tok_json: str, out: str, fast: bool = False) -> float:
    """One process: gzip lines -> clean_text -> ``Tokenizer.encode_batch`` (or, with ``fast``,
    ``encode_batch_fast``, the call the pipeline makes) -> one Parquet file per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = toklib.load_tokenizer(tok_json)
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    for s in range(shards):
        sides = []
        for lang in ("en", "de"):
            with gzip.open(f"{root}/part{s:03d}.{lang}.gz", "rt", encoding="utf-8") as f:
                sides.append([toklib.clean_text(line, "NFC", False) for line in f])
        ids = [
            [e.ids for i in range(0, len(side), 2048) for e in encode(side[i : i + 2048], add_special_tokens=False)]
            for side in sides
        ]
        pq.write_table(
            pa.table(
                {
                    "src": sides[0],
                    "tgt": sides[1],
                    "src_ids": pa.array(ids[0], type=pa.list_(pa.int32())),
                    "tgt_ids": pa.array(ids[1], type=pa.list_(pa.int32())),
                }
            ),
            f"{out}/part{s:03d}.parquet",
        )
        n += len(sides[0])
    return n / (time.perf_counter() - t0)


def ray_data(root: str, tok_json: str, out: str) -> tuple[float, float]:
    """The pipeline's own stages (``cleaned`` -> ``encode_and_write``), the tokenizer given;
    rows/s of the first run on a fresh cluster (worker processes start and import) and the
    best of two more."""
    import ray

    from pipeline.cluster import init_ray
    from pipeline.config import load_config
    from pipeline.data.preprocess import cleaned, encode_and_write
    from pipeline.data.readers import list_tasks

    init_ray()
    cfg = load_config(["data=pairs", f"data.src_files={root}/*.en.gz", f"data.tgt_files={root}/*.de.gz"]).data
    rates = []
    for i in range(3):
        t0 = time.perf_counter()
        counts = encode_and_write(cleaned(cfg, list_tasks(cfg)), cfg, tok_json, tok_json, f"{out}/{i}")
        rates.append(sum(sum(per.values()) for per in counts.values()) / (time.perf_counter() - t0))
    ray.shutdown()
    return rates[0], max(rates[1:])


def our_stages_in_process(root: str, tok_json: str, out: str) -> float:
    """(c): the fused task's functions (read+clean -> encode -> sink) over every read task in
    this process, without Ray; rows/s, best of two (the second has the word cache warm,
    as Ray's reused worker processes do)."""
    import numpy as np

    from pipeline.config import load_config
    from pipeline.data import preprocess as pp
    from pipeline.data.readers import list_tasks

    cfg = load_config(["data=pairs", f"data.src_files={root}/*.en.gz", f"data.tgt_files={root}/*.de.gz"]).data
    clean_cfg = {
        k: getattr(cfg, k) for k in ("normalization", "lowercase", "max_chars", "val_fraction", "test_fraction")
    }
    rates = []
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        sink = pp.SplitSink(out)
        sink.on_write_start()
        for task in list_tasks(cfg):
            batch = {k: np.array([v], dtype=object) for k, v in task.items()}
            for table in pp._read_and_clean(batch, cfg.src_column, cfg.tgt_column, cfg.on_bad_rows, clean_cfg):
                sink.write([pp.encode_batch(table, tok_json, tok_json, cfg.min_tokens, cfg.max_tokens)], None)
                n += table.num_rows
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def _tree_pss(root: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants (the local Ray cluster
    that ``pipeline preprocess`` starts: GCS, raylet, workers, object store pages), so
    shared memory counts once and other processes on the machine not at all."""
    total = 0
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def peak_memory(root: str, out: str) -> tuple[float, float]:
    """Run `pipeline preprocess` on root's shards; (peak PSS of its process tree, seconds)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "preprocess",
            "data=pairs",
            f"data.src_files={root}/*.en.gz",
            f"data.tgt_files={root}/*.de.gz",
            f"data.output_dir={out}",
            "data.vocab_size=4000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.time()
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        peak = max(peak, _tree_pss(ps))
        time.sleep(0.3)
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(err[-3000:])
    return peak, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-preprocess-")
    pairs = generate_pairs(args.pairs, seed=7)
    write_shards(f"{tmp}/x1", pairs, args.shards)
    write_shards(f"{tmp}/x10", pairs * 10, args.shards * 10)
    tok_json = toklib.train_tokenizer([t for p in pairs for t in p], "bpe", 4000).to_str()
    with open(f"{tmp}/tok.json", "w") as f:
        f.write(tok_json)
    single = max(single_process(f"{tmp}/x1", args.shards, tok_json, f"{tmp}/single") for _ in range(2))
    single_fast = max(single_process(f"{tmp}/x1", args.shards, tok_json, f"{tmp}/single", fast=True) for _ in range(2))
    cold, warm = ray_data(f"{tmp}/x1", tok_json, f"{tmp}/ray")
    # One tokenizer thread, as in one Ray task; in a child process, since the thread pool is
    # fixed at its first use in this one.
    ours_one = float(
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"from preprocess import our_stages_in_process as f; print(f({tmp + '/x1'!r}, open({tmp + '/tok.json'!r}).read(), "
                f"{tmp + '/ours'!r}))",
            ],
            env={**os.environ, "RAYON_NUM_THREADS": "1"},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
    )
    mem1, sec1 = peak_memory(f"{tmp}/x1", f"{tmp}/out1")
    mem10, sec10 = peak_memory(f"{tmp}/x10", f"{tmp}/out10")
    out = {
        "bench": "preprocess",
        "cpus": os.cpu_count(),
        "pairs": args.pairs,
        "rows_per_s": {
            "single_process_encode_batch": round(single),
            "single_process_encode_batch_fast": round(single_fast),
            "ray_data_warm": round(warm),
            "ray_data_cold": round(cold),
            "our_stages_one_process_one_thread": round(ours_one),
        },
        "ratio_ray_over_single": round(warm / single, 3),
        "ratio_ray_over_single_fast": round(warm / single_fast, 3),
        "ratio_ray_cold_over_single": round(cold / single, 3),
        "ratio_ray_over_our_stages_one_process": round(warm / ours_one, 3),
        "peak_memory_mb": {"x1": round(mem1 / 2**20), "x10": round(mem10 / 2**20)},
        "seconds": {"x1": round(sec1, 1), "x10": round(sec10, 1)},
        "memory_ratio_x10_over_x1": round(mem10 / max(mem1, 1), 2),
    }
    print(json.dumps(out))
    print(
        f"preprocess: Ray Data {warm:.0f} rows/s (cold cluster {cold:.0f}) vs single process {single:.0f} "
        f"(encode_batch) -> {out['ratio_ray_over_single']:.2f}x, vs {single_fast:.0f} (encode_batch_fast) -> "
        f"{out['ratio_ray_over_single_fast']:.2f}x; our stages in one process, one thread: {ours_one:.0f} "
        f"(Ray / that {out['ratio_ray_over_our_stages_one_process']:.2f}x); peak memory {out['peak_memory_mb']['x1']} MB at 1x, "
        f"{out['peak_memory_mb']['x10']} MB at 10x ({out['memory_ratio_x10_over_x1']}x)"
    )


if __name__ == "__main__":
    main()
