"""A real 2-node Ray cluster on loopback (token auth on), a real `mlflow server` on
127.0.0.1, and `pipeline submit --wait` of a 2-worker training job whose workers land on
different nodes. Every process started here is stopped by its process group."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from loopback import free_port, loopback_cluster, wait_until
from loopback import stop_process_group as stop
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)


# Token authentication on for every node and client (the token: ~/.ray/auth_token).
ENV = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "token"}


def start(args, log):
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=ENV)


def wait_for(check, what, timeout=120, log=None):
    try:
        wait_until(check, what, timeout)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{Path(log).read_text()[-3000:] if log else ''}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    mlflow_port = free_port()
    mlflow = start(
        [
            f"{VENV_BIN}/mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{tmp}/mlflow.db",
            "--serve-artifacts",
            "--artifacts-destination",
            str(tmp / "mlartifacts"),
            "--workers",
            "1",
        ],
        tmp / "mlflow.log",
    )
    try:
        with loopback_cluster(nodes=2, cpus=2, logs=tmp) as ray_cluster:
            wait_for(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status == 200,
                "the MLflow server",
            )
            yield {"tmp": tmp, "address": ray_cluster.dashboard, "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        stop(mlflow)


def submit(cluster, overrides, env):
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "submit",
        "--address",
        cluster["address"],
        "--wait",
        "--",
        "train",
        *overrides,
    ]
    # The plain environment: `pipeline submit` itself must find the token and use it.
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def test_submit_two_workers_on_two_nodes_into_mlflow_server(cluster):
    tmp = cluster["tmp"]
    overrides = [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=2000",
        "data.vocab_size=300",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        "train.num_workers=2",
        "train.max_epochs=1",
        "train.placement_strategy=SPREAD",
        "train.run_name=on-two-nodes",
        "train.batch_tokens=800",
        "train.test_beam_size=1",
        "tracking.system_metrics_s=2",
    ]
    env = {"MLFLOW_TRACKING_URI": cluster["mlflow"], "MLFLOW_EXPERIMENT_NAME": "cluster"}
    p = submit(cluster, overrides, env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "submitted job pipeline-train-" in p.stdout and "SUCCEEDED" in p.stdout
    c = MlflowClient(cluster["mlflow"])
    run = c.search_runs(
        [c.get_experiment_by_name("cluster").experiment_id], filter_string="tags.`pipeline.run_name` = 'on-two-nodes'"
    )[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.num_worker_nodes"] == "2", run.data.tags.get("ray.worker_nodes")
    # System metrics from both nodes, each under its own prefix: system/node-<id>/...
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert len(nodes) == 2 and {n[5:] for n in nodes} == {
        n[:8] for n in run.data.tags["ray.worker_nodes"].split(",")
    }, sorted(run.data.metrics)
    for n in nodes:
        assert {f"system/{n}/cpu_utilization_percentage", f"system/{n}/system_memory_usage_megabytes"} <= set(
            run.data.metrics
        )
    assert "val_bleu" in run.data.metrics and "test_bleu" in run.data.metrics
    assert run.data.tags.get("mlflow.source.git.commit")
    assert "best_checkpoint" in {a.path for a in c.list_artifacts(run.info.run_id)}


def test_node_local_mlflow_store_fails_early(cluster):
    tmp = cluster["tmp"]
    t0 = time.time()
    p = submit(
        cluster,
        ["data=demo_text", f"data.root={tmp}/demo", f"train.storage_path={tmp}/ray"],
        {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/local.db"},
    )
    assert p.returncode == 1
    assert "MLflow is the node-local store" in p.stdout and "use a tracking server" in p.stdout
    assert time.time() - t0 < 120
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "jobs",
            "status",
            p.stdout.split("submitted job ")[1].split()[0],
            "--address",
            cluster["address"],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "FAILED" in status.stdout
