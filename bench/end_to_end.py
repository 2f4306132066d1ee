"""Pipeline benchmark: `pipeline train` end to end (Ray Data into a Ray Train run, 1 worker
unless overridden, MLflow logging) vs a bare single-process loop running the same model and
step on the same preprocessed shards read straight from Parquet, on as many threads as the
run's workers hold CPUs in all (`--bare-threads N` to set them: the old 1-CPU worker against
a loop on both cores).

Both train for the same wall-clock budget, one after the other. Throughput is non-pad
target tokens per second: for the pipeline the median of its logged `train_tokens_per_s`
windows (a window holding a validation pass is an outlier the median ignores), with its
`data_wait_fraction`; for the bare loop tokens over its training time. Prints JSON and a
one-line summary with the ratio pipeline / bare.

    python bench/end_to_end.py [--minutes 3] [overrides ...]   (default data=demo_text model=small)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.train.batching import token_batches
from pipeline.train.run import fit_run, prepare
from pipeline.train.trainer import Trainer


def bare_loop(cfg, prep, seconds: float, device: torch.device | None = None, threads: int = 0) -> dict:
    """Our Trainer, no Ray: Parquet -> the same token-budget batches -> Trainer.step, on
    ``device`` (default the CPU, with ``threads`` threads: default the CPUs of all the run's
    workers, the same cores in all)."""
    device = device or torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads or cfg.train.num_workers * cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    v = prep.vocab
    model = build_model(model_cfg=cfg.model, **v.model_args()).to(device)
    trainer = Trainer(model, cfg.train, device)  # the workers' trainer, without Ray
    table = pq.read_table(f"{prep.data_dir}/train", columns=["id", "src_ids", "tgt_ids", "src_len", "tgt_len"])
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    mega = max(256, cfg.train.sort_window * cfg.train.batch_tokens // 24)
    tokens, steps, t0 = 0, 0, time.perf_counter()
    rng = np.random.default_rng(0)
    while time.perf_counter() - t0 < seconds:
        chunks = ({k: c[i : i + mega] for k, c in rows.items()} for i in range(0, len(rows["id"]), mega))
        for b in token_batches(chunks, cfg.train.batch_tokens, *v.specials, rng):
            trainer.step([b])
            tokens, steps = tokens + b.real_tokens, steps + 1
            if time.perf_counter() - t0 >= seconds:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the steps queued on the GPU count until they are done
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": tokens / elapsed, "steps": steps, "seconds": round(elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument(
        "--bare-threads", type=int, default=0, help="the bare loop's threads (default: the workers' CPUs in all)"
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    cfg = load_config(
        [
            "data=demo_text",
            "model=small",
            "train.num_workers=1",
            "train.max_epochs=1000",
            f"train.max_minutes={args.minutes}",
            f"train.storage_path={tmp}/ray",
            f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            "tracking.log_model=false",
            *args.overrides,
        ]
    )
    prep = prepare(cfg)
    bare = bare_loop(cfg, prep, args.minutes * 60, threads=args.bare_threads)
    t0 = time.time()
    res = fit_run(cfg, prep, "bench-pipeline")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(prep.uri)
    tps = [m.value for m in c.get_metric_history(res["run_id"], "train_tokens_per_s")][1:]  # first: warm-up
    wait = [m.value for m in c.get_metric_history(res["run_id"], "data_wait_fraction")][1:]
    ours = statistics.median(tps)
    out = {
        "bench": "pipeline",
        "device": "cpu",
        "minutes": args.minutes,
        "data": cfg.data.name,
        "hidden": cfg.model.hidden_size,
        "batch_tokens": cfg.train.batch_tokens,
        "num_workers": cfg.train.num_workers,
        "cpus_per_worker": cfg.train.cpus_per_worker,
        "bare_threads": torch.get_num_threads(),
        "bare": {k: round(v, 1) if isinstance(v, float) else v for k, v in bare.items()},
        "pipeline": {
            "tokens_per_s_median": round(ours, 1),
            "windows": len(tps),
            "data_wait_fraction_median": round(statistics.median(wait), 4),
            "data_wait_fraction_max": round(max(wait), 4),
            "wall_s": round(time.time() - t0, 1),
        },
        "ratio_pipeline_over_bare": round(ours / bare["tokens_per_s"], 3),
    }
    print(json.dumps(out))
    print(
        f"pipeline: {ours:.0f} vs bare {bare['tokens_per_s']:.0f} target tokens/s -> "
        f"{out['ratio_pipeline_over_bare']:.2f}x; data wait {out['pipeline']['data_wait_fraction_median']:.1%}"
    )


if __name__ == "__main__":
    main()
