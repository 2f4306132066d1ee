"""Secrets inside config values (URI passwords and tokens, signed query strings) never
reach what is printed or logged: MLflow params (a real SQLite store), the config.yaml
artifact text, `pipeline config`, error lines, and `pipeline submit` (refused before any
cluster is asked, so no entrypoint or runtime_env could show them). No Ray needed."""

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.cluster import ClusterError, job_spec
from pipeline.config import load_config

# key -> a value with a fake secret in it; SECRETS are the parts that must never show.
PLANTED = {
    "data.src_files": "s3://AKIAFAKE:fake-secret-x@bucket/x?X-Amz-Signature=fake-sig-y&X-Amz-Date=20260101",
    "data.files": "https://acct.blob.core.windows.net/c/*.parquet?sv=2024&sig=fake-sas-sig&se=2026",
    "data.root": "https://ghp_faketoken123@github.com/org/corpus",
    "train.storage_path": "s3://bucket/ray?access_token=fake-tok-q",
    "tracking.tracking_uri": "postgresql://mlflow:fake-pw-z/9@db:5432/mlflow",
}
SECRETS = ["fake-secret-x", "fake-sig-y", "fake-sas-sig", "ghp_faketoken123", "fake-tok-q", "fake-pw-z"]


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def overrides() -> list[str]:
    return [f"{k}={v}" for k, v in PLANTED.items()]


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    "value,shown",
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("s3://AKIA:abc/def@bucket/k", "s3://AKIA:***@bucket/k"),  # AWS secret keys hold raw "/"
        ("https://ghp_abc@github.com/o/r.git", "https://***@github.com/o/r.git"),
        (
            "https://h/x?X-Amz-Signature=s1&X-Amz-Credential=c1&a=1",
            "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***&a=1",
        ),
        (
            "https://h/x?TOKEN=t&sig=s&Password=p&secret=x&key=k&api_key=a&access_token=b",
            "https://h/x?TOKEN=***&sig=***&Password=***&secret=***&key=***&api_key=***&access_token=***",
        ),
        ("host=db password=xyz", "host=db password=***"),
        ("s3://k:s1@b/1,s3://c:s2@y/2", "s3://k:***@b/1,s3://c:***@y/2"),
        # Nothing secret: left as it is.
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
        ("https://h/x?monkey=1&keyword=2", "https://h/x?monkey=1&keyword=2"),
        ("artifacts/data", "artifacts/data"),
    ],
)
def test_redact(value, shown):
    assert tracking.redact(value) == shown
    assert tracking.redact(shown) == shown  # idempotent: a resumed run compares redacted params


def test_config_values_are_redacted_where_logged_but_real_for_the_workers(tmp_path):
    cfg = load_config(overrides())
    assert cfg.data.src_files == PLANTED["data.src_files"]  # the workers get the real value
    assert set(leaked(str(cfg.flat()))) == set(SECRETS)  # the test plants what it looks for
    assert not leaked(str(cfg.redacted_flat())), cfg.redacted_flat()
    assert not leaked(cfg.redacted_yaml()), cfg.redacted_yaml()
    assert "s3://AKIAFAKE:***@bucket/x?X-Amz-Signature=***" in cfg.redacted_yaml()
    assert set(cfg.redacted_flat()) == set(cfg.flat())
    # Logged as fit_run logs them, into a real MLflow store; read back.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id, _ = tracking.open_run(uri, "secrets", "r1", cfg.redacted_flat(), {})
    tracking.log_text(uri, run_id, cfg.redacted_yaml(), "config.yaml")
    c = MlflowClient(uri)
    params = c.get_run(run_id).data.params
    assert len(params) == len(cfg.flat()) and not leaked(str(params))
    with open(c.download_artifacts(run_id, "config.yaml", str(tmp_path))) as f:
        assert not leaked(f.read())
    # Even a caller that passes the raw flat() gets redacted params (log_params redacts too).
    run2, _ = tracking.open_run(uri, "secrets", "r2", cfg.flat(), {})
    assert not leaked(str(c.get_run(run2).data.params))
    store = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert not [s for s in SECRETS if s.encode() in store]


@pytest.mark.slow
def test_pipeline_config_output_and_error_lines_are_redacted():
    p = run_cli("config", *overrides())
    assert p.returncode == 0, p.stderr[-2000:]
    assert not leaked(p.stdout + p.stderr) and "postgresql://mlflow:***@db:5432/mlflow" in p.stdout
    # An error quoting a bad value: the value is quoted redacted.
    p = run_cli("config", "data.src_lang=http://u:fake-pw-z@host")
    assert p.returncode == 2 and "data.src_lang='http://u:***@host' is not a safe name" in p.stderr, p.stderr
    assert not leaked(p.stdout + p.stderr)


@pytest.mark.slow
def test_submit_refuses_secrets_before_asking_the_cluster():
    # No cluster at that address: the refusal comes first, so nothing was sent or shown.
    p = run_cli(
        "submit",
        "--address",
        "http://127.0.0.1:1",
        "--",
        "train",
        "data=demo_text",
        "tracking.tracking_uri=http://u:fake-pw-z@mlflow:5000",
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "'tracking.tracking_uri=http://u:***@mlflow:5000' holds a secret" in p.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in p.stderr and not leaked(p.stdout + p.stderr)
    # A secret in the forwarded environment would be in the runtime_env's env_vars.
    p = run_cli(
        "submit",
        "--address",
        "http://127.0.0.1:1",
        "--",
        "train",
        env={"MLFLOW_TRACKING_URI": "https://ghp_faketoken123@mlflow.example"},
    )
    assert p.returncode == 2 and "MLFLOW_TRACKING_URI=https://***@mlflow.example holds a secret" in p.stderr, p.stderr
    assert not leaked(p.stdout + p.stderr)


def test_job_spec_carries_no_secret_and_refuses_one(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    entrypoint, runtime_env = job_spec(["train", "data=demo_text", "train.num_workers=2"])
    assert entrypoint == "python -m pipeline.cli train data=demo_text train.num_workers=2"
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for key, value in PLANTED.items():
        with pytest.raises(ClusterError, match="holds a secret") as e:
            job_spec(["train", f"{key}={value}"])
        assert not leaked(str(e.value))
