"""A real 2-node Ray cluster on loopback (token auth on), a real `mlflow server` on
127.0.0.1, and `pipeline submit --wait` of a 2-worker training job whose workers land on
different nodes; and what a job carries (its own conf/, durable paths, credentials by name).
Every process started here is stopped by its process group."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from loopback import ctrl_c_when, free_port, loopback_cluster, wait_until
from loopback import stop_process_group as stop
from mlflow.tracking import MlflowClient

from pipeline.train.loop import latest_checkpoint

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
    # What an image may bake in: another conf/ (the Dockerfile's PIPELINE_CONF_DIR), and the
    # cluster's own MLflow credentials (the Ray pods' Secret on KubeRay).
    baked = tmp / "baked-conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", baked)
    (baked / "model" / "small.yaml").write_text("hidden_size: 66\n")
    node_env = {"PIPELINE_CONF_DIR": str(baked), **CLUSTER_CREDS}
    try:
        with loopback_cluster(nodes=2, cpus=2, logs=tmp, env=node_env) as ray_cluster:
            wait_for(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status == 200,
                "the MLflow server",
            )
            yield {"tmp": tmp, "address": ray_cluster.dashboard, "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        stop(mlflow)


CLUSTER_CREDS = {"MLFLOW_TRACKING_USERNAME": "cluster-user-fake", "MLFLOW_TRACKING_PASSWORD": "cluster-pw-fake-9"}


def submit(cluster, overrides, env, command="train"):
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "submit",
        "--address",
        cluster["address"],
        "--wait",
        "--",
        command,
        *overrides,
    ]
    # The plain environment: `pipeline submit` itself must find the token and use it.
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def demo_train(tmp, name, *extra):
    """`pipeline train` overrides of a small run on the demo corpus (the same data for every test)."""
    return [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=2000",
        "data.vocab_size=300",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        f"train.run_name={name}",
        "train.batch_tokens=800",
        *extra,
    ]


def test_submit_two_workers_on_two_nodes_into_mlflow_server(cluster):
    overrides = demo_train(
        cluster["tmp"],
        "on-two-nodes",
        "train.num_workers=2",
        "train.max_epochs=1",
        "train.placement_strategy=SPREAD",
        "train.test_beam_size=1",
        "tracking.system_metrics_s=2",
    )
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
        ["data=demo_text", f"data.root={tmp}/demo", f"data.output_dir={tmp}/data", f"train.storage_path={tmp}/ray"],
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


def job_id_of(p):
    return p.stdout.split("submitted job ")[1].split()[0]


def test_a_job_keeps_nothing_in_its_temporary_folder_and_carries_credentials_by_name(cluster):
    tmp = cluster["tmp"]
    durable = tmp / "durable"
    mine = {"MLFLOW_TRACKING_USERNAME": "submitter-user-fake", "MLFLOW_TRACKING_PASSWORD": "submitter-pw-fake-7"}
    values = [*mine.values(), *CLUSTER_CREDS.values()]
    # Default (relative) paths: moved under PIPELINE_DURABLE_ROOT, forwarded by submit.
    p = submit(cluster, ["model=small"], {**mine, "PIPELINE_DURABLE_ROOT": str(durable)}, command="config")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "runtime_resources/working_dir_files/_ray_pkg_" in out  # it did run in Ray's temporary folder
    assert f"storage_path: {durable}/ray_results" in out and f"output_dir: {durable}/artifacts/data" in out
    assert f"tracking_uri: sqlite:///{durable}/mlflow.db" in out
    assert "hidden_size: 128" in out and "hidden_size: 66" not in out  # the uploaded conf/, not the node's
    assert "credentials by name only: MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD" in out
    # What Ray shows anyone who can see the cluster (dashboard, `ray job list`), as its SDK reads it.
    show = (
        "import json, sys; from ray.job_submission import JobSubmissionClient as C; "
        "i = C(sys.argv[1]).get_job_info(sys.argv[2]); print(json.dumps([i.runtime_env, i.entrypoint, i.metadata]))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", show, cluster["address"], job_id_of(p)], capture_output=True, text=True, env=ENV
    ).stdout
    assert json.loads(shown)[0]["env_vars"]["PIPELINE_DURABLE_ROOT"] == str(durable), shown
    assert "PIPELINE_CREDENTIALS_BY_NAME" in shown and not [v for v in values if v in shown]
    assert not [v for v in values if v in out]
    # The same job without a durable root, and a credential the cluster lacks: refused, naming both.
    p = submit(cluster, [], {"MLFLOW_TRACKING_TOKEN": "submitter-token-fake-5"}, command="config")
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-4000:]
    assert "MLFLOW_TRACKING_TOKEN set where this job was submitted, but not on this cluster" in out
    assert "train.storage_path=ray_results" in out and "PIPELINE_DURABLE_ROOT" in out
    assert "submitter-token-fake-5" not in out and "Traceback" not in out


def pipeline_jobs(cluster, action, job_id):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs", action, job_id, "--address", cluster["address"]],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ctrl_c_leaves_a_job_running_and_jobs_stop_ends_its_run_as_killed(cluster):
    """Ctrl-C in `pipeline submit --wait` stops following, not the job, and says how to reach
    it; `pipeline jobs stop` (SIGTERM to the driver, as Ray sends it) then ends the run as a
    Ctrl-C would: the workers aborted, the MLflow run KILLED, the lock released. Before, the
    first printed only "interrupted", with no word of the job going on."""
    tmp, name = cluster["tmp"], "stopped-job"
    args = [sys.executable, "-m", "pipeline.cli", "submit", "--address", cluster["address"], "--wait", "--", "train"]
    args += demo_train(tmp, name, "train.num_workers=1", "train.max_epochs=50", "train.eval_every=20")
    env = {**os.environ, "MLFLOW_TRACKING_URI": cluster["mlflow"], "MLFLOW_EXPERIMENT_NAME": "stopped"}
    rc, out = ctrl_c_when(args, env, lambda: latest_checkpoint(f"{tmp}/ray/{name}") is not None, "a checkpoint")
    assert rc == 130 and "submitted job pipeline-train-" in out, out[-3000:]
    job = out.split("submitted job ")[1].split()[0]
    at = f"--address {cluster['address']}"
    assert f"stopped following job {job}; it goes on on the cluster" in out, out[-3000:]
    assert f"pipeline jobs logs {job} {at}" in out and f"pipeline jobs stop {job} {at}" in out, out[-3000:]
    assert pipeline_jobs(cluster, "status", job).stdout.startswith(f"{job}: RUNNING")
    c = MlflowClient(cluster["mlflow"])
    runs = c.search_runs([c.get_experiment_by_name("stopped").experiment_id])
    assert [r.info.status for r in runs] == ["RUNNING"]
    assert "stop requested" in pipeline_jobs(cluster, "stop", job).stdout
    wait_until(lambda: pipeline_jobs(cluster, "status", job).stdout.startswith(f"{job}: STOPPED"), "STOPPED", 120)
    logs = pipeline_jobs(cluster, "logs", job).stdout
    assert re.search(rf"\[train\] interrupted: the MLflow run is KILLED; .*train.run_name={name}", logs), logs[-3000:]
    assert c.get_run(runs[0].info.run_id).info.status == "KILLED"
    assert not (tmp / "ray" / name / ".pipeline-lock.json").exists()
