"""An MLflow outage, on a real `mlflow server` (127.0.0.1, SQLite) stopped and started again
on the same port and database, with the client told to fail fast: the buffered RunLogger
keeps every record while the server is away and sends each exactly once, with its original
step and timestamp, when it answers; what is still unsent at close goes to a spill file that
`pipeline tracking replay` sends once. The end-to-end test does it to `pipeline train`."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from loopback import free_port, wait_until
from loopback import stop_process_group as stop
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.train.loop import LOG_EVERY

VENV_BIN = str(Path(sys.executable).parent)


class Server:
    """`mlflow server` on a fixed port and database, so it can be stopped and started again."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        log = open(self.tmp / "mlflow.log", "a")
        self.proc = subprocess.Popen(
            [
                f"{VENV_BIN}/mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.tmp}/mlflow.db",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.tmp / "mlartifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200, "the MLflow server", 300
            )
        except TimeoutError as e:
            pytest.fail(f"{e}\n{(self.tmp / 'mlflow.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One server for the module (its start costs seconds): each test takes it up, and may
    stop and start it; each logs into an experiment of its own."""
    s = Server(tmp_path_factory.mktemp("outage-server"))
    yield s
    s.stop()


@pytest.fixture
def server(module_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast, as the test asks
    if module_server.proc is None:
        module_server.start()
    return module_server


def _new_run(uri: str) -> str:
    c = MlflowClient(uri)
    name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]
    return c.create_run(c.create_experiment(name)).info.run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, int]]:
    return sorted((m.step, m.timestamp) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_logger_keeps_records_through_an_outage_and_sends_each_once(server, tmp_path):
    run_id = _new_run(server.uri)
    log = tracking.RunLogger(server.uri, run_id, str(tmp_path / "spill"), retry_s=1.0)
    stamps: dict[int, tuple[int, int]] = {}

    def log_step(step: int) -> float:
        t0 = time.time()
        log.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        stamps[step] = (int(t0 * 1000), int(time.time() * 1000))
        log.flush()
        return time.time() - t0

    for step in range(1, 6):
        log_step(step)
    assert log.flush(timeout=30) == 0
    server.stop()
    down_at = time.time()
    slowest = max(log_step(step) for step in range(6, 11))
    artifact = tmp_path / "notes.txt"
    artifact.write_text("written during the outage")
    log.log_artifact(artifact, "outage")
    artifact.unlink()  # the logger kept a copy
    log.set_tags({"outage": "yes"})
    assert log.flush(timeout=5) > 0, "nothing was waiting to be sent while the server was away"
    assert slowest < 0.5, f"a logging call took {slowest:.2f} s while the server was away"
    time.sleep(2)  # a few retry intervals fall in the outage
    server.start()
    up_at = time.time()
    assert log.flush(timeout=30) == 0, "records still queued after the server came back"
    assert log.close() == 0 and log.spilled_to is None
    print(f"\n[outage] server away {up_at - down_at:.1f} s; 5 steps logged during it, all sent after")
    history = _history(server.uri, run_id, "loss")
    assert [s for s, _ in history] == list(range(1, 11)), "a step is missing or logged twice"
    for step, ts in history:
        assert stamps[step][0] <= ts <= stamps[step][1], f"step {step} lost its original timestamp"
    assert all(ts < up_at * 1000 for s, ts in history if s > 5)
    c = MlflowClient(server.uri)
    assert c.get_run(run_id).data.tags["outage"] == "yes"
    assert [a.path for a in c.list_artifacts(run_id, "outage")] == ["outage/notes.txt"]


@pytest.mark.slow
def test_close_during_an_outage_spills_and_replay_sends_once(server, tmp_path):
    run_id = _new_run(server.uri)
    spill = tmp_path / "spill"
    log = tracking.RunLogger(server.uri, run_id, str(spill), retry_s=1.0)
    log.log_metrics({"loss": 1.0}, 1)
    assert log.flush(timeout=30) == 0
    server.stop()
    for step in range(2, 5):
        log.log_metrics({"loss": 1.0 / step}, step)
    log.log_text("a: 1\n", "config/notes.yaml")
    log.end_run("FINISHED")
    t0 = time.time()
    left = log.close(wait_s=2.0)
    assert time.time() - t0 < 10
    assert left == 5 and log.spilled_to and Path(log.spilled_to).exists()
    lines = [json.loads(x) for x in Path(log.spilled_to).read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["metrics"] * 3 + ["artifact", "end_run"]
    assert (spill / lines[3]["path"]).read_text() == "a: 1\n"  # the artifact's copy, beside the records
    assert "replay" in log.unsent_message(left)
    server.start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    first = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "tracking", "replay", str(spill)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sent 5 record(s)" in first.stdout, first.stdout
    assert tracking.replay(str(spill), server.uri) == (0, 0), "a second replay sent something again"
    assert [s for s, _ in _history(server.uri, run_id, "loss")] == [1, 2, 3, 4]
    c = MlflowClient(server.uri)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(run_id, "config")] == ["config/notes.yaml"]
    assert not list(spill.glob("*.jsonl")) and not list((spill / "files").iterdir())


@pytest.mark.slow
def test_a_refused_record_raises_and_does_not_block_the_rest(server, tmp_path):
    run_id = _new_run(server.uri)
    log = tracking.RunLogger(server.uri, run_id, str(tmp_path / "spill"), retry_s=1.0)
    log.log_metrics({"bad key!": 1.0}, 1)  # MLflow refuses the name: not an outage
    log.set_tags({"after": "ok"})
    with pytest.raises(MlflowException):
        log.flush(timeout=30)
    assert log.flush(timeout=30) == 0
    assert MlflowClient(server.uri).get_run(run_id).data.tags["after"] == "ok"
    assert log.close() == 0


@pytest.mark.slow
def test_a_restarted_logger_skips_steps_mlflow_has_even_when_it_asks_during_an_outage(server, tmp_path):
    run_id = _new_run(server.uri)
    first = tracking.RunLogger(server.uri, run_id, str(tmp_path / "spill"), retry_s=1.0)
    for step in (20, 40, 60):
        first.log_metrics({"train_loss": 1.0}, step)
    assert first.close() == 0
    server.stop()  # the worker group restarts from a checkpoint at step 40, during an outage
    again = tracking.RunLogger(server.uri, run_id, str(tmp_path / "spill"), retry_s=1.0)
    again.skip_logged_steps()
    for step in (60, 80):
        again.log_metrics({"train_loss": 0.5}, step)
    assert again.flush(timeout=3) == 3
    server.start()
    assert again.flush(timeout=30) == 0 and again.close() == 0
    assert [s for s, _ in _history(server.uri, run_id, "train_loss")] == [20, 40, 60, 80]


@pytest.mark.slow
def test_pipeline_train_survives_an_mlflow_outage_and_logs_every_step_once(server, tmp_path):
    """The issue's test: `pipeline train` against a real server that is stopped once training
    steps are logged and started again a while later (same port, same database). It starts
    its own local Ray (not the session's): the Ray workers must inherit the fail-fast client
    setting, as they do for a user's `pipeline train`, else MLflow's retries hide the outage."""
    run_name = "outage"
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
        f"train.run_name={run_name}",
        "train.num_workers=1",
        "train.max_epochs=3",
        "train.batch_tokens=300",
        "train.eval_every=40",
        "train.test_beam_size=1",
        "tracking.log_model=false",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_EXPERIMENT_NAME": "outage",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    out = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    c = MlflowClient(server.uri)

    def train_steps() -> list[int]:
        exp = c.get_experiment_by_name("outage")
        runs = c.search_runs([exp.experiment_id]) if exp else []
        return [m.step for m in c.get_metric_history(runs[0].info.run_id, "train_loss")] if runs else []

    try:
        wait_until(lambda: len(train_steps()) >= 2 or proc.poll() is not None, "logged training steps", 400)
        assert proc.poll() is None, "training ended before the outage:\n" + (tmp_path / "train.log").read_text()[-3000:]
        server.stop()
        down_at = time.time()

        def validations_since_kill() -> int:
            return len(re.findall(r"\[train\] step \d+ epoch", (tmp_path / "train.log").read_text()[log_at_kill:]))

        # Down for 20 s and two validations at least (several log intervals): the server's own
        # start then takes from seconds to a minute or more on a busy machine, still mid-training.
        log_at_kill = len((tmp_path / "train.log").read_text())
        wait_until(
            lambda: (time.time() - down_at >= 20 and validations_since_kill() >= 2) or proc.poll() is not None,
            "training to go on during the outage",
            300,
        )
        assert proc.poll() is None, "training ended during the outage:\n" + (tmp_path / "train.log").read_text()[-3000:]
        server.start()
        up_at = time.time()
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            stop(proc)
    log = (tmp_path / "train.log").read_text()
    assert rc == 0, log[-4000:]
    runs = c.search_runs([c.get_experiment_by_name("outage").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info.status for r in runs]
    run_id = runs[0].info.run_id
    history = c.get_metric_history(run_id, "train_loss")
    train = sorted(m.step for m in history)
    assert train == list(range(LOG_EVERY, LOG_EVERY * len(train) + 1, LOG_EVERY)), f"gaps or duplicate steps: {train}"
    during = [m.step for m in history if down_at * 1000 <= m.timestamp <= up_at * 1000]
    validations = sorted({int(s) for s in re.findall(r"\[train\] step (\d+) epoch", log)})
    val = sorted(m.step for m in c.get_metric_history(run_id, "val_loss"))
    assert val == validations and val, f"val_loss steps {val}, validations run {validations}"
    for key in ("val_bleu", "val_chrf", "best_val_bleu"):
        assert len(c.get_metric_history(run_id, key)) == len(val), key
    assert "test_bleu" in runs[0].data.metrics
    assert "is away" in log and "answers again" in log
    assert not list((tmp_path / "ray" / run_name).glob("mlflow-unsent/*.jsonl")), "records were left unsent"
    print(
        f"\n[outage] MLflow server away {up_at - down_at:.1f} s; {len(during)} train_loss step(s) logged during it "
        f"({during}); {len(train)} train steps and {len(val)} validations in MLflow, none lost or repeated"
    )
    assert during, "no training step fell in the outage"
