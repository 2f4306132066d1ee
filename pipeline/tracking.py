"""Everything MLflow: where runs go, opening or reopening a run, logging from rank 0.

The tracking URI is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a
SQLite store ``mlflow.db`` in the working directory; the experiment likewise comes from
``tracking.experiment``, ``MLFLOW_EXPERIMENT_NAME`` or "pipeline". A run is tagged with
its Ray run name, so running again with the same ``train.run_name`` appends to it.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from .config import TrackingConfig

RUN_NAME_TAG = "pipeline.run_name"
# scheme://user:password@host (the password may hold a raw "/"): the password is hidden.
_USER_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/?#@\s,]*):(?P<pw>[^\s,]*)@")
# scheme://token@host, userinfo without a colon: in practice a token (https://ghp_...@github.com),
# so all of it is hidden; a user name alone is little to lose.
_USER_ONLY = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^:/?#@\s,]+@")
# A query-string or key=value secret: a parameter whose name is, or ends in, one of these
# words (token, access_token, X-Amz-Signature, sig, api_key, client_secret, ...).
_SECRET_PARAM = re.compile(r"(?i)(?P<name>(?:^|(?<=[?&;\s]))(?:[\w.-]*[_.-])?"
                           r"(?:token|secret|password|passwd|pwd|signature|sig|key|apikey|credential|auth)=)"
                           r"[^&;#\s]*")


class TrackingError(RuntimeError):
    """MLflow is misconfigured or unreachable."""


def redact(value: Any) -> Any:
    """Hide secrets in a string: the password of ``scheme://user:password@host`` (-> ``user:***@``),
    a userinfo without a password (``https://TOKEN@host`` -> ``https://***@host``) and
    secret-looking parameters (``?token=``, ``X-Amz-Signature=``, ``sig=``, ``password=``,
    ``api_key=``, ... -> ``=***``). Anything that is not a string comes back as it is."""
    if not isinstance(value, str):
        return value
    value = _USER_PASSWORD.sub(r"\g<scheme>\g<user>:***@", value)
    value = _USER_ONLY.sub(r"\g<scheme>***@", value)
    return _SECRET_PARAM.sub(r"\g<name>***", value)


def resolve(cfg: TrackingConfig) -> tuple[str, str]:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Workers run in other processes (and directories): pin the file to an absolute path.
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pipeline"
    return uri, experiment


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training starts, not after, when a tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server {redact(uri)} answered /health with HTTP {r.status}")
        except OSError as e:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({e}); "
                                "start it or fix MLFLOW_TRACKING_URI / tracking.tracking_uri") from e


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _artifact_root(uri: str, experiment: str) -> str | None:
    """A local SQLite store keeps its artifacts beside the database file, not in
    whatever directory the first run happened to start in (MLflow's ./mlruns)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlruns" / experiment).as_uri()
    return None


def git_commit() -> str | None:
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> tuple[str, bool]:
    """Create the run for ``run_name``, or reopen the one that already has that name.

    Returns (run_id, resumed). Params already logged keep their first value (MLflow
    params are immutable); a changed value is reported, not silently dropped.
    """
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment, artifact_location=_artifact_root(uri, experiment))
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run = found[0]
        c.update_run(run.info.run_id, status="RUNNING")
        old = run.data.params
        changed = {k: (old[k], str(v)) for k, v in params.items() if k in old and old[k] != str(redact(v))}
        if changed:
            print(f"[tracking] resumed run keeps its first params; changed now: {changed}", flush=True)
        params = {k: v for k, v in params.items() if k not in old}
        run_id, resumed = run.info.run_id, True
    else:
        run_id = c.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags}).info.run_id
        resumed = False
    log_params(uri, run_id, params)
    return run_id, resumed


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(redact(v))) for k, v in params.items()]
    c = client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def last_step(uri: str, run_id: str, key: str) -> int:
    """The highest step logged for ``key`` (-1 when none): a restarted worker group re-runs
    steps past its checkpoint and must not log them twice."""
    history = client(uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def last_steps(uri: str, run_id: str) -> dict[str, int]:
    """The highest step logged for each metric of the run: a worker group that restarts
    (from a checkpoint, or from scratch before its first one) re-runs steps and logs a
    metric only at steps it does not have yet."""
    c = client(uri)
    return {key: max((m.step for m in c.get_metric_history(run_id, key)), default=-1)
            for key in c.get_run(run_id).data.metrics}


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_table(uri: str, run_id: str, data: dict[str, list], artifact_file: str) -> None:
    """A table in MLflow's table layout; replaces (MlflowClient.log_table would append
    to the rows a resumed run logged before)."""
    cols = list(data)
    rows = [list(r) for r in zip(*(data[c] for c in cols))]
    client(uri).log_dict(run_id, {"columns": cols, "data": rows}, artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def log_model(uri: str, run_id: str, model: Any, extra_files: list[str]) -> str:
    """Log the nn.Module with ``mlflow.pytorch.log_model`` into the given run.

    Pickle format keeps the decoding methods (an exported pt2 graph would keep only
    ``forward``); ``pipeline translate`` itself reloads the weights-only state dict and
    the JSON files in ``extra_files``, never the pickle.
    """
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        extra_files=extra_files, pip_requirements=["torch", "tokenizers"])
    return info.model_uri


def register_champion(uri: str, model_uri: str, name: str, alias: str = "champion") -> str:
    """Register a logged model under ``name`` and point the alias at the new version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = mlflow.register_model(model_uri, name).version
    client(uri).set_registered_model_alias(name, alias, version)
    return str(version)
