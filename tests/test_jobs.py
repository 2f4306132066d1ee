"""What a submitted job carries and checks, without a cluster: the job spec (conf/, forwarded
variables, credentials by name), durable paths in Ray's temporary working folder, and the
meaning of RAY_ADDRESS. The same on a real cluster: tests/test_cluster.py."""

from __future__ import annotations

import pytest

from pipeline import cluster
from pipeline.cluster import ClusterError, job_spec, prepare_job
from pipeline.config import ConfigError, load_config

CREDS = {
    "MLFLOW_TRACKING_TOKEN": "tok-fake-111",
    "MLFLOW_TRACKING_USERNAME": "user-fake-222",
    "MLFLOW_TRACKING_PASSWORD": "pw-fake-333",
}


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    """A process in a job's working folder, where Ray unpacks an uploaded working_dir."""
    where = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    where.mkdir(parents=True)
    monkeypatch.chdir(where)
    for k in (*CREDS, cluster.DURABLE_ROOT, cluster.CREDENTIALS_BY_NAME, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    return where


def test_job_spec_sends_credentials_by_name_and_the_uploaded_conf(monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(cluster.DURABLE_ROOT, "/mnt/shared")
    entrypoint, runtime_env = job_spec(["train", "data=demo_text"])
    env = runtime_env["env_vars"]
    assert env[cluster.CREDENTIALS_BY_NAME] == ",".join(CREDS)
    assert not [v for v in CREDS.values() if v in repr(runtime_env) + entrypoint]
    assert env[cluster.DURABLE_ROOT] == "/mnt/shared"
    # Relative to the job's working folder, where the project (conf/ included) is unpacked.
    assert env["PIPELINE_CONF_DIR"] == "conf" and runtime_env["working_dir"] == str(cluster.PROJECT_ROOT)


def test_job_spec_refuses_a_conf_dir_it_would_not_upload(monkeypatch, tmp_path):
    from pipeline import config

    monkeypatch.setattr(config, "CONF_DIR", tmp_path / "conf")
    with pytest.raises(ClusterError, match="PIPELINE_CONF_DIR=.* is outside the project folder"):
        job_spec(["train"])


def test_relative_kept_paths_go_under_the_durable_root(job_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cluster.DURABLE_ROOT, str(tmp_path / "durable"))
    cfg = load_config(["data=demo_text", "train.storage_path=/abs/ray", "data.root=./demo"])
    assert prepare_job(cfg, {"report --out": "reports/s1"}) == {"report --out": f"{tmp_path}/durable/reports/s1"}
    assert cfg.train.storage_path == "/abs/ray"  # absolute: left alone
    assert cfg.data.root == f"{tmp_path}/durable/demo"
    assert cfg.data.output_dir == f"{tmp_path}/durable/artifacts/data"
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/durable/mlflow.db"
    err = capsys.readouterr().err
    assert f"job: data.output_dir=artifacts/data -> {tmp_path}/durable/artifacts/data" in err
    assert "config options from" in err


def test_relative_kept_paths_are_refused_without_a_durable_root(job_dir):
    cfg = load_config(["data=demo_text", "data.root=/abs/demo"])
    with pytest.raises(ConfigError) as e:
        prepare_job(cfg)
    msg = str(e.value)
    assert "Ray's temporary working folder, deleted after the job" in msg
    for key in ("train.storage_path=ray_results", "data.output_dir=artifacts/data", "tracking.tracking_uri"):
        assert key in msg
    assert "data.root" not in msg and cluster.DURABLE_ROOT in msg
    # Inputs may stay relative: they are read from the uploaded project.
    absolute = ["data=multi30k", "data.root=corpus", "train.storage_path=/s", "data.output_dir=/o"]
    prepare_job(load_config([*absolute, "tracking.tracking_uri=http://mlflow:5000"]))


def test_outside_a_job_nothing_moves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cluster.CREDENTIALS_BY_NAME, raising=False)
    cfg = load_config(["data=demo_text"])
    prepare_job(cfg)
    assert cfg.train.storage_path == "ray_results" and cfg.tracking.tracking_uri == ""


def test_a_credential_named_but_missing_on_the_cluster_is_refused_by_name(job_dir, monkeypatch):
    monkeypatch.setenv(cluster.CREDENTIALS_BY_NAME, "MLFLOW_TRACKING_USERNAME,MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "u")
    with pytest.raises(ConfigError) as e:
        prepare_job()
    assert "MLFLOW_TRACKING_PASSWORD set where this job was submitted, but not on this cluster" in str(e.value)
    assert "MLFLOW_TRACKING_USERNAME" not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p")
    prepare_job()


def test_a_deleted_working_folder_is_named(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(ClusterError, match="was deleted under it"):
        cluster.job_working_dir()


def test_a_dashboard_url_in_ray_address_is_refused_by_commands_that_join(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ClusterError, match="is a dashboard .* GCS address .*pipeline submit -- COMMAND"):
        cluster.init_ray()
