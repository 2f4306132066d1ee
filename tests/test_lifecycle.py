"""A run's life across reruns and restarts, on the session's real Ray and a real MLflow
store: budgets that are totals (a rerun with a larger one trains on, a killed worker does
not extend it), early stopping decided by the validation that triggers it, no duplicate
MLflow steps after a restart before the first checkpoint, and a run_name that refuses to
resume over other data or another config."""

import glob
import json
import os
import re
import signal
import tempfile
import threading
import time

import psutil
import pytest
from loopback import ctrl_c_when
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, load_config
from pipeline.train.loop import LOG_EVERY, latest_checkpoint
from pipeline.train.run import run_training

pytestmark = pytest.mark.slow


def _overrides(tmp, name, *extra):
    return [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=3000",
        "data.vocab_size=500",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        f"train.run_name={name}",
        "train.num_workers=1",
        "train.batch_tokens=300",
        "train.test_beam_size=1",
        "tracking.log_model=false",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.experiment={name}",
        *extra,
    ]


def _history(uri, run_id, key):
    """A metric's history in step order (MLflow returns it in no set order)."""
    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _steps(uri, run_id, key):
    return [m.step for m in _history(uri, run_id, key)]


def _state(tmp, name):
    _step, path = latest_checkpoint(f"{tmp}/ray/{name}")
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def _kill_worker_when(check, timeout=400):
    """SIGKILL the Ray Train worker once ``check()`` holds; returns the kill time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            if not check():
                continue
        except Exception:
            continue
        workers = [
            p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])
        ]
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            return time.time()
    raise AssertionError("the run never reached the point to kill its worker")


def _run_id(uri, experiment):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id]) if exp else []
    return runs[0].info.run_id if runs else None


def test_budget_is_a_total_a_rerun_trains_for_the_difference(ray_session, tmp_path, capfd):
    """max_minutes=0.2 stops at step S; the same run_name with 0.5 resumes and trains on
    (main trained zero steps: the stop reason was kept in the checkpoint), in the same MLflow
    run, and the run's training time in all is the larger budget, not the sum of both. Budgets
    may change on a rerun; the model, the training recipe and the data may not."""
    base = _overrides(tmp_path, "budget", "train.max_epochs=100", "train.eval_every=40")
    temp_before = _temp_dirs()
    first = run_training(load_config(base + ["train.max_minutes=0.2"]))
    uri = first["tracking_uri"]
    s1 = max(_steps(uri, first["run_id"], "val_loss"))
    assert "stop reason: max_minutes" in capfd.readouterr().out
    second = run_training(load_config(base + ["train.max_minutes=0.5"]))
    assert second["run_id"] == first["run_id"]
    out = capfd.readouterr().out
    assert f"at step {s1}" in out and "stop reason: max_minutes" in out
    train = _steps(uri, second["run_id"], "train_loss")
    assert train == list(range(LOG_EVERY, LOG_EVERY * len(train) + 1, LOG_EVERY)), "gaps or duplicate steps"
    assert _state(tmp_path, "budget")["step"] > s1, "the rerun with a larger budget trained no more steps"
    val = _steps(uri, second["run_id"], "val_loss")
    assert val == sorted(set(val))
    elapsed = _state(tmp_path, "budget")["elapsed_s"]
    assert 30 <= elapsed < 30 + 25, f"{elapsed:.1f} s of training for a 30 s total budget"
    # Once more with the same budget: spent, so nothing is trained, validated or tested again.
    third = run_training(load_config(base + ["train.max_minutes=0.5"]))
    assert "already tested" in capfd.readouterr().out
    assert _steps(uri, third["run_id"], "val_loss") == val
    tested = _steps(uri, third["run_id"], "test_bleu")  # tested after the first and the second run
    assert len(tested) == len(set(tested)) == 2, tested
    # Checkpoints are staged, and bundles copied for logging, in folders that are removed after.
    left = [d for d in _temp_dirs() - temp_before if _belongs_to(d, first["run_id"])]
    assert not left, f"temporary folders left behind: {left}"
    # The same run_name over another config or other data is refused before training, each
    # difference listed (main resumed another corpus of the same vocabulary size silently).
    with pytest.raises(ConfigError) as e:
        run_training(load_config(base + ["model.hidden_size=96", "train.lr=0.01", "train.max_epochs=2"]))
    msg = str(e.value)
    assert "train.run_name 'budget'" in msg and "model.hidden_size: 128 != 96" in msg and "train.lr:" in msg
    assert "max_epochs" not in msg and "another name" in msg
    with pytest.raises(ConfigError, match=r"data: demo_text-en-de-\w+ != demo_text-en-de-\w+"):
        run_training(load_config(base + ["data.demo_size=2000", f"data.root={tmp_path}/demo2"]))
    assert _steps(uri, first["run_id"], "val_loss") == val  # nothing was trained or logged by them


def _temp_dirs():
    return {p for pattern in ("ckpt-*", "pipeline-*") for p in glob.glob(os.path.join(tempfile.gettempdir(), pattern))}


def _belongs_to(folder, run_id):
    """A staged checkpoint of this run (other processes on the machine may stage their own)."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f).get("mlflow_run_id") == run_id
    except (OSError, ValueError):
        return os.path.basename(folder).startswith("pipeline-")


def test_killed_worker_does_not_extend_the_budget(ray_session, tmp_path):
    """A worker SIGKILLed after a checkpoint: the group restarts from it with the training
    time the checkpoint recorded, so the run's time in training stays about its budget."""
    name = "preempted"
    cfg = load_config(
        _overrides(
            tmp_path,
            name,
            "train.max_epochs=100",
            "train.eval_every=40",
            "train.max_minutes=0.75",
            "train.max_failures=1",
        )
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    # Killed well into the budget, right after a checkpoint written 25 s or more into training:
    # a restart that started the clock again would train 25 s more than the budget.
    killed_at = _kill_worker_when(
        lambda: (
            lambda rid: (
                _history(uri, rid, "val_loss")[-1].timestamp / 1000
                - _history(uri, rid, "train_loss")[0].timestamp / 1000
                > 25
            )
        )(_run_id(uri, name))
    )
    thread.join(timeout=600)
    assert "run_id" in result, "the run did not finish after its worker was killed"
    run = MlflowClient(uri).get_run(result["run_id"])
    resumed_at = float(run.data.tags["pipeline.resumed_at"])
    resumed_step = int(run.data.tags["pipeline.resumed_from_step"])
    train = _history(uri, result["run_id"], "train_loss")
    val = _history(uri, result["run_id"], "val_loss")
    first_step_at = train[0].timestamp / 1000 - 1  # about when the first step started
    ckpt_at = next(m.timestamp / 1000 for m in val if m.step == resumed_step)
    end_at = val[-1].timestamp / 1000
    trained = (ckpt_at - first_step_at) + (end_at - resumed_at)  # the work that counts
    lost = killed_at - ckpt_at
    print(
        f"\n[lifecycle] budget 45 s: trained {trained:.1f} s that count, {lost:.1f} s lost to the kill, "
        f"restart {resumed_at - killed_at:.1f} s, {ckpt_at - first_step_at:.1f} s before the checkpoint"
    )
    # A restart that started the clock again would train the whole budget after the kill, on
    # top of the time before the checkpoint (25 s or more). ``resumed_at`` is the restarted
    # attempt's first batch (its data pipeline's start is not budget time); the slack is the
    # last validation and checkpoint, which end the run after the budget's last step.
    before = ckpt_at - first_step_at
    assert trained < 45 + 15, (
        f"{trained:.1f} s of training for a 45 s budget ({before:.1f} s before the checkpoint): the restart extended it"
    )
    assert _state(tmp_path, name)["elapsed_s"] >= 45
    steps = [m.step for m in train]
    assert steps == list(range(LOG_EVERY, LOG_EVERY * len(steps) + 1, LOG_EVERY)), "gaps or duplicate steps"


def test_early_stopping_stops_at_the_validation_that_triggers_it(ray_session, tmp_path, capfd):
    """lr ~ 0: the first validation is the best there will be, so early_stopping=1 stops right
    after the second one, mid-epoch (main checked only at the end of an epoch, before its
    validation). The same run_name with more patience trains on."""
    base = _overrides(
        tmp_path, "early", "train.max_epochs=5", "train.eval_every=20", "train.lr=1e-12", "train.warmup_steps=0"
    )
    first = run_training(load_config(base + ["train.early_stopping=1"]))
    uri = first["tracking_uri"]
    assert _steps(uri, first["run_id"], "val_loss") == [20, 40]
    assert "stop reason: early_stopping" in capfd.readouterr().out
    more = run_training(load_config(base + ["train.early_stopping=3"]))
    assert more["run_id"] == first["run_id"]
    assert _steps(uri, more["run_id"], "val_loss") == [20, 40, 60, 80]


def test_restart_before_the_first_checkpoint_logs_no_step_twice(ray_session, tmp_path):
    """A worker killed after steps were logged but before any checkpoint: the group starts
    again from step 0 and must not log the steps it already logged (main did)."""
    name = "early-kill"
    cfg = load_config(_overrides(tmp_path, name, "train.max_epochs=1", "train.max_failures=1"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    _kill_worker_when(
        lambda: (lambda rid: max(_steps(uri, rid, "train_loss")) >= 2 * LOG_EVERY and not _steps(uri, rid, "val_loss"))(
            _run_id(uri, name)
        )
    )
    thread.join(timeout=600)
    assert "run_id" in result, "the run did not finish after its worker was killed"
    run = MlflowClient(uri).get_run(result["run_id"])
    assert "pipeline.resumed_from_step" not in run.data.tags  # it had no checkpoint to resume from
    for key in ("train_loss", "lr", "train_tokens_per_s"):
        steps = _steps(uri, result["run_id"], key)
        assert steps == list(range(LOG_EVERY, LOG_EVERY * len(steps) + 1, LOG_EVERY)), f"{key}: {steps}"
    assert len(_steps(uri, result["run_id"], "val_loss")) == 1


def test_second_run_with_the_same_name_refuses_naming_the_first(ray_session, tmp_path):
    """Two `pipeline train` with one train.run_name at once (real processes): the second
    exits at once with an error naming the running one; the first is not disturbed."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "pipeline.cli", "train", *_overrides(tmp_path, "twice", "train.max_epochs=1")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    first = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        lock = tmp_path / "ray" / "twice" / ".pipeline-lock.json"
        deadline = time.time() + 300
        while not lock.exists():
            assert first.poll() is None and time.time() < deadline, "the first run never took its lock"
            time.sleep(0.5)
        t0 = time.time()
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"train.run_name 'twice' is already running (pid {first.pid} on host" in second.stderr
        assert "MLflow run" not in second.stdout  # refused before anything was opened or logged
        print(f"\n[lifecycle] second run refused in {time.time() - t0:.1f} s")
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-3000:]
        # The default console: our lines, a progress line for the epoch, the one validation and the
        # summary; no Ray internals (a worker's line would start with Ray's "(pid=...)" prefix).
        lines = out.splitlines()
        assert not [x for x in lines if x.startswith("(") or "TrainingReport(" in x or "Execution plan" in x], out
        assert len([x for x in lines if x.startswith("[train] step ") and " val_loss " in x]) == 1, out
        assert "[train] epoch 1 done step " in out and "== done ==" in out and len(lines) < 40, out
        # The epoch's own figures, also when it is shorter than a log window (it printed 0.000 then).
        done = re.search(r"\[train\] epoch 1 done step (\d+): loss ([\d.]+), ([\d,]+) tokens/s", out)
        assert done and float(done[2]) > 0.5 and float(done[3].replace(",", "")) > 0, out
        log = tmp_path / "ray" / "twice" / "logs" / "console.log"
        assert f"[console] Ray's output is in {log}" in out
        assert "TrainingReport(" in log.read_text() and "Execution plan" in log.read_text()
        print(f"[lifecycle] pipeline train printed {len(lines)} lines")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not lock.exists()


def test_ctrl_c_stops_the_run_as_killed_and_says_how_to_go_on(ray_session, tmp_path):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) after the first
    checkpoint: Ray Train aborts the workers; the driver exits 130 saying so, with the newest
    checkpoint's step and the run name to go on with, the MLflow run is KILLED (not FAILED)
    and the run's lock is released. Before, it exited 1 without a word and the run was FAILED."""
    import sys

    name = "ctrl-c"
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        *_overrides(tmp_path, name, "train.max_epochs=50", "train.eval_every=20"),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The first validation's checkpoint, watched on disk: this process opening the MLflow
    # database while the driver still creates its tables would race it.
    rc, out = ctrl_c_when(
        args, env, lambda: latest_checkpoint(f"{tmp_path}/ray/{name}") is not None, "the first checkpoint"
    )
    assert rc == 130, out[-3000:]
    newest = latest_checkpoint(f"{tmp_path}/ray/{name}")[0]
    assert re.search(
        rf"\[train\] interrupted: .*newest checkpoint is at step {newest}\b.*train.run_name={name}", out
    ), out
    assert MlflowClient(uri).get_run(_run_id(uri, name)).info.status == "KILLED"
    assert not (tmp_path / "ray" / name / ".pipeline-lock.json").exists()
