"""Preprocessing benchmark: Ray Data tokenisation vs single-process ``encode_batch``, and the
memory that preprocessing needs for a corpus and for 10x that corpus.

1. Throughput: the same gzip shard pairs (the generated demo corpus, 8 shards) are read,
   cleaned and encoded (a) in one process: gzip lines -> ``clean_text`` ->
   ``Tokenizer.encode_batch`` (HF tokenizers, itself multi-threaded) and (b) by the
   pipeline's Ray Data stages: read tasks -> clean -> the ``Encode`` actor pool,
   materialised. Same trained tokenizer, rows/s side by side.
2. Memory: ``pipeline preprocess`` on the corpus and on 10x the corpus (each in its own
   process and Ray cluster); the peak of the machine's used memory above its level before,
   sampled every 0.2 s (Ray's object store included), and the ratio of the two.

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
import threading
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


def single_process(root: str, shards: int, tok_json: str) -> float:
    tok = toklib.load_tokenizer(tok_json)
    t0 = time.perf_counter()
    n = 0
    for s in range(shards):
        sides = []
        for lang in ("en", "de"):
            with gzip.open(f"{root}/part{s:03d}.{lang}.gz", "rt", encoding="utf-8") as f:
                sides.append([toklib.clean_text(line, "NFC", False) for line in f])
        for side in sides:
            for i in range(0, len(side), 2048):
                toklib.encode(tok, side[i : i + 2048])
        n += len(sides[0])
    return n / (time.perf_counter() - t0)


def ray_data(root: str, tok_json: str) -> float:
    import ray

    from pipeline.config import load_config
    from pipeline.data.preprocess import Encode, _clean_batch
    from pipeline.data.readers import list_tasks, read_tasks
    from pipeline.train.run import init_ray

    init_ray()
    cfg = load_config(["data=pairs", f"data.src_files={root}/*.en.gz", f"data.tgt_files={root}/*.de.gz"]).data
    tasks = list_tasks(cfg)
    clean_cfg = {k: getattr(cfg, k) for k in ("normalization", "lowercase", "max_chars", "val_fraction", "test_fraction")}
    n_actors = max(1, min(4, int(ray.cluster_resources().get("CPU", 1))))
    t0 = time.perf_counter()
    ds = (ray.data.from_items(tasks, override_num_blocks=len(tasks))
          .map_batches(read_tasks, fn_args=(cfg.src_column, cfg.tgt_column, cfg.on_bad_rows), batch_size=1)
          .map_batches(_clean_batch, fn_args=(clean_cfg,), batch_format="numpy")
          .map_batches(Encode, fn_constructor_args=(tok_json, tok_json, cfg.min_tokens, cfg.max_tokens),
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors), batch_size=2048,
                       batch_format="numpy")
          .materialize())
    n = ds.count()
    rate = n / (time.perf_counter() - t0)
    ray.shutdown()
    return rate


def peak_memory(root: str, out: str) -> tuple[float, float]:
    """Run `pipeline preprocess` on root's shards; (peak used bytes above the start, seconds)."""
    base = psutil.virtual_memory().used
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], psutil.virtual_memory().used - base)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "preprocess", "data=pairs",
                           f"data.src_files={root}/*.en.gz", f"data.tgt_files={root}/*.de.gz",
                           f"data.output_dir={out}", "data.vocab_size=4000"], capture_output=True, text=True)
    done.set()
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return peak[0], time.time() - t0


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
    single = single_process(f"{tmp}/x1", args.shards, tok_json)
    ours = ray_data(f"{tmp}/x1", tok_json)
    mem1, sec1 = peak_memory(f"{tmp}/x1", f"{tmp}/out1")
    mem10, sec10 = peak_memory(f"{tmp}/x10", f"{tmp}/out10")
    out = {"bench": "preprocess", "cpus": os.cpu_count(), "pairs": args.pairs,
           "rows_per_s": {"single_process": round(single), "ray_data": round(ours)},
           "ratio_ray_over_single": round(ours / single, 3),
           "peak_memory_mb": {"x1": round(mem1 / 2**20), "x10": round(mem10 / 2**20)},
           "seconds": {"x1": round(sec1, 1), "x10": round(sec10, 1)},
           "memory_ratio_x10_over_x1": round(mem10 / max(mem1, 1), 2)}
    print(json.dumps(out))
    print(f"preprocess: Ray Data {ours:.0f} vs single process {single:.0f} rows/s -> {out['ratio_ray_over_single']:.2f}x; "
          f"peak memory {out['peak_memory_mb']['x1']} MB at 1x, {out['peak_memory_mb']['x10']} MB at 10x "
          f"({out['memory_ratio_x10_over_x1']}x)")


if __name__ == "__main__":
    main()
