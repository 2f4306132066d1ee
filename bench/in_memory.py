"""Splits in memory vs streamed from storage: the same 1-worker `pipeline train` twice, one
after the other on one local Ray, with `train.in_memory_mb=0` (every epoch and validation
starts a read of the Parquet files) and with the default (read once into the object store).

Figures per run, from its MLflow record: seconds from the run's first logged training step
to its last validation (what epochs and validations cost beyond the steps), the median
seconds a validation takes (the val_loss timestamp minus the timestamp of the training step
logged just before it, so a log window's steps are not counted), and the run's wall time.
Prints JSON and a summary with the ratios streamed / in memory.

    python bench/in_memory.py [--epochs 3] [overrides ...]   (default data=demo_text model=small)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from pipeline.config import load_config
from pipeline.train.run import fit_run, prepare


def one_run(base: list[str], tmp: str, name: str, extra: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    cfg = load_config([*base, f"train.storage_path={tmp}/ray-{name}", *extra])
    prep = prepare(cfg)
    t0 = time.time()
    res = fit_run(cfg, prep, name)
    wall = time.time() - t0
    c = MlflowClient(prep.uri)
    train = sorted((m.step, m.timestamp / 1000) for m in c.get_metric_history(res["run_id"], "train_loss"))
    val = sorted((m.step, m.timestamp / 1000) for m in c.get_metric_history(res["run_id"], "val_loss"))
    per_val = []
    for step, at in val:
        before = [t for s, t in train if s <= step and t <= at]
        if before:
            per_val.append(at - max(before))
    return {
        "steps": train[-1][0] if train else 0,
        "validations": len(val),
        "first_step_to_last_validation_s": round(val[-1][1] - train[0][1], 1),
        "validation_s_median": round(statistics.median(per_val), 2),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-in-memory-")
    base = [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=3000",
        "data.vocab_size=500",
        f"data.output_dir={tmp}/data",
        "train.num_workers=1",
        "train.batch_tokens=300",
        "train.eval_every=60",
        f"train.max_epochs={args.epochs}",
        "train.test_beam_size=1",
        "tracking.log_model=false",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
        *args.overrides,
    ]
    streamed = one_run(base, tmp, "streamed", ["train.in_memory_mb=0"])
    in_memory = one_run(base, tmp, "in-memory", [])
    out = {
        "bench": "in_memory",
        "epochs": args.epochs,
        "streamed": streamed,
        "in_memory": in_memory,
        "ratio_first_step_to_last_validation": round(
            streamed["first_step_to_last_validation_s"] / in_memory["first_step_to_last_validation_s"], 2
        ),
        "ratio_validation": round(streamed["validation_s_median"] / in_memory["validation_s_median"], 2),
        "ratio_wall": round(streamed["wall_s"] / in_memory["wall_s"], 2),
    }
    print(json.dumps(out))
    print(
        f"in memory vs streamed: first step to last validation {in_memory['first_step_to_last_validation_s']} s vs "
        f"{streamed['first_step_to_last_validation_s']} s ({out['ratio_first_step_to_last_validation']}x), a validation "
        f"{in_memory['validation_s_median']} s vs {streamed['validation_s_median']} s ({out['ratio_validation']}x), "
        f"run {in_memory['wall_s']} s vs {streamed['wall_s']} s ({out['ratio_wall']}x); "
        f"{streamed['steps']} and {in_memory['steps']} steps"
    )


if __name__ == "__main__":
    main()
