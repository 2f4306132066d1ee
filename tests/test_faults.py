"""Faults survived, on real processes: a training worker SIGKILLed mid-epoch is restarted
by Ray Train from the latest checkpoint (itself mid-epoch), MLflow keeps one run with step
metrics that neither repeat nor skip, and each example of the interrupted epoch is trained
on exactly once."""

import json
import os
import signal
import threading
import time
from collections import Counter

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.train.loop import LOG_EVERY
from pipeline.train.run import run_training

pytestmark = pytest.mark.slow


def _steps(c, run_id, key):
    return [m.step for m in c.get_metric_history(run_id, key)]


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_worker_sigkill_mid_epoch_resumes_into_the_same_run(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trace = tmp_path / "trace"
    trace.mkdir()
    cfg = load_config(
        [
            "data=demo_text",
            "model=small",
            f"data.root={tmp_path}/demo",
            "data.demo_size=4000",
            "data.vocab_size=500",
            f"data.output_dir={tmp_path}/data",
            f"train.storage_path={tmp_path}/ray",
            "train.run_name=killed",
            "train.num_workers=2",
            "train.max_epochs=2",
            "train.batch_tokens=300",
            "train.eval_every=50",
            f"train.trace_examples={trace}",
            "train.max_failures=2",
            "train.test_beam_size=1",
            "tracking.log_model=false",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment=faults",
        ]
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    c = MlflowClient(uri)
    killed_at = None
    deadline = time.time() + 600
    while time.time() < deadline and thread.is_alive():
        time.sleep(1)
        exp = c.get_experiment_by_name("faults")
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if not runs:
            continue
        val, train = _steps(c, runs[0].info.run_id, "val_loss"), _steps(c, runs[0].info.run_id, "train_loss")
        # Mid-epoch, after a mid-epoch checkpoint (the second validation, at step 100) and more steps.
        if len(val) >= 2 and train and max(train) >= val[-1] + LOG_EVERY:
            workers = _train_workers()
            assert workers, "no Ray Train worker process found"
            killed_pids = {p.pid for p in workers}  # the whole first attempt's group
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed_at, steps_before = time.time(), max(train)
            break
    assert killed_at, "training never reached the point to kill a worker"
    thread.join(timeout=900)
    assert not thread.is_alive() and "run_id" in result, "the run did not complete after the worker was killed"
    exp = c.get_experiment_by_name("faults")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == result["run_id"] and runs[0].info.status == "FINISHED"
    run = runs[0]
    resumed_at = float(run.data.tags["pipeline.resumed_at"])
    print(
        f"\n[faults] worker killed at step {steps_before}; training resumed from step "
        f"{run.data.tags['pipeline.resumed_from_step']} {resumed_at - killed_at:.1f} s after the kill"
    )
    assert 0 < int(run.data.tags["pipeline.resumed_from_step"]) <= steps_before
    train = _steps(c, run.info.run_id, "train_loss")
    assert train == list(range(LOG_EVERY, LOG_EVERY * len(train) + 1, LOG_EVERY)), "gaps or duplicate steps"
    assert max(train) > steps_before  # it went on past the kill
    val = _steps(c, run.info.run_id, "val_loss")
    assert val == sorted(set(val))
    assert "test_bleu" in run.data.metrics
    _assert_interrupted_epoch_exactly_once(trace, int(run.data.tags["pipeline.resumed_from_step"]), killed_pids)
    # Data parallel for real: each worker trained on its share (a split read as one block
    # once went whole to one worker, the other stepping on empty batches).
    per_rank = Counter()
    for path in trace.glob("*.jsonl"):
        per_rank[path.stem.split("-")[0]] += sum(len(json.loads(line)["ids"]) for line in path.read_text().splitlines())
    assert len(per_rank) == 2 and min(per_rank.values()) > 0.4 * sum(per_rank.values()), per_rank


def _assert_interrupted_epoch_exactly_once(trace, resumed_step, killed_pids):
    """The steps that count: the first attempt's up to the checkpoint, then the second's."""
    records = []
    for path in trace.glob("*.jsonl"):
        pid = int(path.stem.split("-")[1])
        records += [dict(json.loads(line), first=pid in killed_pids) for line in path.read_text().splitlines()]
    epoch = next(r["epoch"] for r in records if r["step"] == resumed_step + 1 and not r["first"])
    counted = Counter(
        i for r in records if r["epoch"] == epoch and (not r["first"] or r["step"] <= resumed_step) for i in r["ids"]
    )
    whole = {i for r in records for i in r["ids"]}  # every training example, seen in some epoch
    assert resumed_step > 0 and epoch >= 0
    assert set(counted.values()) == {1}, "an example of the interrupted epoch was trained on twice"
    assert set(counted) == whole, "an example of the interrupted epoch was never trained on"


def test_killed_driver_rerun_resumes_into_the_same_run(ray_session, tmp_path):
    """`pipeline train` SIGKILLed after its first checkpoint; the same command again resumes
    from that checkpoint into the same MLflow run."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        "data=demo_text",
        "model=small",
        f"data.root={tmp_path}/demo",
        "data.demo_size=3000",
        "data.vocab_size=500",
        f"data.output_dir={tmp_path}/data",
        f"train.storage_path={tmp_path}/ray",
        "train.run_name=driver",
        "train.num_workers=1",
        "train.max_epochs=1",
        "train.batch_tokens=300",
        "train.eval_every=40",
        "train.test_beam_size=1",
        "tracking.log_model=false",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=driver",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    c = MlflowClient(uri)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:  # kill the driver after a checkpoint, mid-training
            exp = c.get_experiment_by_name("driver") if (tmp_path / "mlflow.db").exists() else None
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if (
                runs
                and _steps(c, runs[0].info.run_id, "val_loss")
                and max(_steps(c, runs[0].info.run_id, "train_loss") or [0]) >= 40 + LOG_EVERY
            ):
                break
            assert proc.poll() is None, "training ended before it could be interrupted"
            time.sleep(1)
        else:
            pytest.fail("no checkpoint within 400 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = c.search_runs([c.get_experiment_by_name("driver").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert int(run.data.tags["pipeline.resumed_from_step"]) >= 40
    train = _steps(c, run.info.run_id, "train_loss")
    assert train == list(range(LOG_EVERY, LOG_EVERY * len(train) + 1, LOG_EVERY)), "gaps or duplicate steps"
    assert "test_bleu" in run.data.metrics


def test_latest_checkpoint_is_found_by_listing_and_partial_uploads_are_passed_over(tmp_path):
    """The resume's fallback when Ray's controller never recorded a checkpoint (driver killed
    in that moment): the newest checkpoint folder whose files are all there."""
    import numpy as np
    import torch

    from pipeline.train.loop import latest_checkpoint
    from pipeline.train.trainer import save_checkpoint as _save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = tmp_path / "run"
    run.mkdir()
    assert latest_checkpoint(str(run)) is None and latest_checkpoint(str(tmp_path / "absent")) is None
    for name, step in (("checkpoint_a", 40), ("checkpoint_b", 80), ("checkpoint_c", 120)):
        os.rename(_save_checkpoint(model, opt, sched, scaler, {"step": step}, np.arange(3)), run / name)
    assert latest_checkpoint(str(run)) == (120, str(run / "checkpoint_c"))
    with open(run / "checkpoint_c" / "model.pt", "r+b") as f:  # an upload cut short
        f.truncate(10)
    assert latest_checkpoint(str(run)) == (80, str(run / "checkpoint_b"))
    (run / "checkpoint_b" / "files.json").unlink()  # an upload that never got to its list
    assert latest_checkpoint(str(run)) == (40, str(run / "checkpoint_a"))
    assert latest_checkpoint(f"file://{run}")[0] == 40
