"""A real 2-node Ray cluster on loopback (token auth on), a real `mlflow server` on
127.0.0.1, and `pipeline submit --wait` of a 2-worker training job whose workers land on
different nodes. Every process started here is stopped by its process group."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Token authentication on for every node and client (the token: ~/.ray/auth_token).
ENV = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "token"}


def start(args, log):
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=ENV)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def answers(url: str) -> bool:
    """The server is up: any HTTP answer counts (with token auth on, an anonymous call gets 401)."""
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        pass
    return True


def wait_for(check, what, timeout=120, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    tail = Path(log).read_text()[-3000:] if log else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    short = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    procs = []
    try:
        mlflow_port = free_port()
        procs.append(start([f"{VENV_BIN}/mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                            "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", "--serve-artifacts",
                            "--artifacts-destination", str(tmp / "mlartifacts"), "--workers", "1"], tmp / "mlflow.log"))
        gcs, dash = free_port(), free_port()
        common = ["--num-cpus=2", "--block", "--disable-usage-stats", "--include-log-monitor=false"]
        procs.append(start([f"{VENV_BIN}/ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
                            "--node-ip-address=127.0.0.1", f"--temp-dir={short}/head", *common], tmp / "head.log"))
        wait_for(lambda: answers(f"http://127.0.0.1:{dash}/api/version"), "the head node's dashboard", log=tmp / "head.log")
        procs.append(start([f"{VENV_BIN}/ray", "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={short}/worker", *common],
                           tmp / "worker.log"))
        count = [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{gcs}', logging_level='ERROR');"
                 "print(sum(n['Alive'] for n in ray.nodes()))"]
        wait_for(lambda: subprocess.run(count, capture_output=True, text=True, timeout=60, env=ENV).stdout.strip() == "2",
                 "2 alive nodes", log=tmp / "worker.log")
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status == 200,
                 "the MLflow server")
        yield {"tmp": tmp, "address": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(short, ignore_errors=True)


def submit(cluster, overrides, env):
    args = [sys.executable, "-m", "pipeline.cli", "submit", "--address", cluster["address"], "--wait", "--", "train",
            *overrides]
    # The plain environment: `pipeline submit` itself must find the token and use it.
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def test_submit_two_workers_on_two_nodes_into_mlflow_server(cluster):
    tmp = cluster["tmp"]
    overrides = ["data=demo_text", "model=small", f"data.root={tmp}/demo", "data.demo_size=2000",
                 "data.vocab_size=300", f"data.output_dir={tmp}/data", f"train.storage_path={tmp}/ray",
                 "train.num_workers=2", "train.max_epochs=1", "train.placement_strategy=SPREAD",
                 "train.run_name=on-two-nodes", "train.batch_tokens=800", "train.test_beam_size=1"]
    env = {"MLFLOW_TRACKING_URI": cluster["mlflow"], "MLFLOW_EXPERIMENT_NAME": "cluster"}
    p = submit(cluster, overrides, env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "submitted job pipeline-train-" in p.stdout and "SUCCEEDED" in p.stdout
    c = MlflowClient(cluster["mlflow"])
    run = c.search_runs([c.get_experiment_by_name("cluster").experiment_id],
                        filter_string="tags.`pipeline.run_name` = 'on-two-nodes'")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.num_worker_nodes"] == "2", run.data.tags.get("ray.worker_nodes")
    assert "val_bleu" in run.data.metrics and "test_bleu" in run.data.metrics
    assert run.data.tags.get("mlflow.source.git.commit")
    assert "best_checkpoint" in {a.path for a in c.list_artifacts(run.info.run_id)}


def test_node_local_mlflow_store_fails_early(cluster):
    tmp = cluster["tmp"]
    t0 = time.time()
    p = submit(cluster, ["data=demo_text", f"data.root={tmp}/demo", f"train.storage_path={tmp}/ray"],
               {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/local.db"})
    assert p.returncode == 1
    assert "MLflow is the node-local store" in p.stdout and "use a tracking server" in p.stdout
    assert time.time() - t0 < 120
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "jobs", "status",
                             p.stdout.split("submitted job ")[1].split()[0], "--address", cluster["address"]],
                            capture_output=True, text=True, timeout=60)
    assert "FAILED" in status.stdout
