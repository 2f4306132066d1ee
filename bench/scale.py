"""Scale benchmark: `pipeline train` with 1 worker vs 2 workers on a 2-node Ray cluster on
loopback (one worker per node, STRICT_SPREAD), same model and the same tokens per worker
per step (weak scaling: the global batch doubles).

Both runs train for the same wall-clock budget on a fresh ``loopback_cluster``; throughput
is the median of the logged ``train_tokens_per_s`` windows (non-pad target tokens/s over
all workers). Efficiency = throughput(2) / (2 x throughput(1)). Also printed: the gradient
bytes each worker allreduces per step (ring: 2 (N-1)/N x parameters x 4 bytes) and the
step times, so the cost of the second worker can be set against what it communicates.

    python bench/scale.py [--minutes 2] [overrides ...]   (default data=demo_text model=small)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the loopback harness
from loopback import loopback_cluster, mlflow_server, stop_process_group

from pipeline.config import load_config


def run(workers: int, minutes: float, tmp: str, overrides: list[str], address: str, uri: str) -> dict:
    """One `pipeline train` process against the cluster (its own driver, as a user would run it)."""
    from mlflow.tracking import MlflowClient

    name = f"scale-{workers}"
    args = [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        f"data.output_dir={tmp}/data",
        f"train.num_workers={workers}",
        "train.placement_strategy=STRICT_SPREAD",
        "train.max_epochs=1000",
        f"train.max_minutes={minutes}",
        f"train.storage_path={tmp}/ray",
        f"train.run_name={name}",
        "train.test_beam_size=1",
        "tracking.log_model=false",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=scale",
        *overrides,
    ]
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", *args], env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-3000:])
    c = MlflowClient(uri)
    r = c.search_runs(
        [c.get_experiment_by_name("scale").experiment_id], filter_string=f"tags.`pipeline.run_name` = '{name}'"
    )[0]
    hist = {
        k: c.get_metric_history(r.info.run_id, k)[1:]  # first window: warm-up
        for k in ("train_tokens_per_s", "data_wait_fraction")
    }
    tps = hist["train_tokens_per_s"]
    # A window is LOG_EVERY steps; its wall time from the log timestamps (median: windows
    # holding a validation are outliers).
    step_ms = statistics.median((b.timestamp - a.timestamp) / (b.step - a.step) for a, b in itertools.pairwise(tps))
    return {
        "workers": workers,
        "nodes": r.data.tags.get("ray.num_worker_nodes"),
        "tokens_per_s": statistics.median(m.value for m in tps),
        "windows": len(tps),
        "step_ms": round(step_ms, 1),
        "data_wait_fraction": statistics.median(m.value for m in hist["data_wait_fraction"]),
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    cfg = load_config(["data=demo_text", "model=small", *args.overrides])
    from pipeline.models import build_model

    params = sum(
        p.numel()
        for p in build_model(
            model_cfg=cfg.model,
            src_vocab_size=cfg.data.vocab_size,
            tgt_vocab_size=cfg.data.vocab_size,
            joint_vocab=True,
        ).parameters()
    )
    results = []
    mlflow, uri = mlflow_server(Path(tmp))
    try:
        with loopback_cluster(nodes=2, cpus=2, logs=Path(tmp) / "logs") as cluster:
            for workers in (1, 2):
                results.append(run(workers, args.minutes, tmp, args.overrides, cluster.gcs, uri))
    finally:
        stop_process_group(mlflow)
    one, two = results
    efficiency = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    out = {
        "bench": "scale",
        "cpus": os.cpu_count(),
        "minutes": args.minutes,
        "parameters": params,
        "allreduce_mb_per_worker_per_step": round(2 * (2 - 1) / 2 * params * 4 / 2**20, 2),
        "runs": results,
        "step_ms_added_by_the_second_worker": round(two["step_ms"] - one["step_ms"], 1),
        "efficiency_2_over_1": round(efficiency, 3),
    }
    print(json.dumps(out))
    print(
        f"scale: 1 worker {one['tokens_per_s']:.0f}, 2 workers on 2 nodes {two['tokens_per_s']:.0f} target tokens/s "
        f"-> efficiency {efficiency:.2f}; step {one['step_ms']} -> {two['step_ms']} ms with "
        f"{out['allreduce_mb_per_worker_per_step']} MB allreduced per worker per step"
    )


if __name__ == "__main__":
    main()
