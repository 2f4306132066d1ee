"""A small split into the object store: read by Ray Data tasks vs by the driver.

The same preprocessed split, on one local Ray, alternately (a) read as Ray Data tasks and
materialized (``read_parquet(...).repartition(...).materialize()``, what a run did for a
split within ``train.in_memory_mb`` before) and (b) ``split_dataset`` as it is now (read
in this process, put into the object store with ``from_blocks`` in the same blocks). Each
result is counted, so both are complete in the object store when the clock stops. Prints
JSON and the median seconds of each with the ratio (a) / (b).

    python bench/split_read.py [--repeats 5] [--pairs 3000]   (a demo corpus it writes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import ray

from pipeline.cluster import init_ray
from pipeline.config import TrainConfig, load_config
from pipeline.tasks import task_for
from pipeline.train.run import rows_per_block, split_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=3000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-split-read-")
    cfg = load_config(
        [
            "data=demo_text",
            f"data.root={tmp}/demo",
            f"data.demo_size={args.pairs}",
            "data.vocab_size=500",
            f"data.output_dir={tmp}/data",
        ]
    )
    init_ray(2)  # the local Ray a run starts (loopback, token auth)
    task = task_for(cfg)
    data_dir, manifest = task.preprocess(cfg.data)
    rows = task.split_rows(manifest["splits"]["train"])
    t = TrainConfig(num_workers=2)
    path = f"{data_dir}/train"

    def by_tasks() -> int:
        ds = ray.data.read_parquet(path, num_cpus=0.25).repartition(target_num_rows_per_block=rows_per_block(rows, 2))
        return ds.materialize().count()

    def by_driver() -> int:
        return split_dataset(data_dir, "train", rows, t).count()

    times: dict[str, list[float]] = {"ray_data_tasks": [], "driver": []}
    for _ in range(args.repeats):
        for name, fn in (("ray_data_tasks", by_tasks), ("driver", by_driver)):
            t0 = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t0)
            assert n == rows, (name, n, rows)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bench": "split_read",
        "rows": rows,
        "repeats": args.repeats,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "ratio_tasks_over_driver": round(med["ray_data_tasks"] / med["driver"], 1),
    }
    print(json.dumps(out))
    print(
        f"a {rows}-row training split into the object store: Ray Data tasks {med['ray_data_tasks']:.2f} s, "
        f"the driver {med['driver']:.3f} s (median of {args.repeats}): {out['ratio_tasks_over_driver']}x"
    )


if __name__ == "__main__":
    main()
