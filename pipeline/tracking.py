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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import TrackingConfig
from .redaction import redact

RUN_NAME_TAG = "pipeline.run_name"
# MLflow 3's UI opens an experiment by this tag: "custom_model_development" (runs, charts) rather
# than the GenAI overview (traces) it guesses for an untagged one (server/js, mlflow.experimentKind).
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# What mlflow.start_run tags a run with (its context providers): the runs table's User, Source
# and Version columns read them.
CONTEXT_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")


class TrackingError(RuntimeError):
    """MLflow is misconfigured or unreachable."""


def resolve(cfg: TrackingConfig) -> tuple[str, str]:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Workers run in other processes (and directories): pin the file to an absolute path.
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    experiment = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pipeline"
    return uri, experiment


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training starts, not after, when a tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:  # noqa: S310 (http(s) checked above)
                if r.status != 200:
                    raise TrackingError(f"MLflow server {redact(uri)} answered /health with HTTP {r.status}")
        except OSError as e:
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} is unreachable ({e}); "
                "start it or fix MLFLOW_TRACKING_URI / tracking.tracking_uri"
            ) from e


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def fluent_store(uri: str):
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``register_model``) at
    ``uri`` for the block, then put back what the process had. MLflow 3's
    ``set_tracking_uri``/``set_registry_uri`` also write ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI`` into ``os.environ``: left there, the next run, sweep or client
    in a notebook, and every program started after, would go to this store."""
    import mlflow

    saved = {k: os.environ.get(k) for k in _URI_VARS}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _artifact_root(uri: str, experiment: str) -> str | None:
    """A local SQLite store keeps its artifacts beside the database file, not in
    whatever directory the first run happened to start in (MLflow's ./mlruns)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlruns" / experiment).as_uri()
    return None


def git_commit() -> str | None:
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def context_tags() -> dict[str, str]:
    """The context tags ``mlflow.start_run`` would give a run started here (MLflow's own
    context providers), the commit from :func:`git_commit`; what is unknown is left out.
    A sweep computes them once on its driver: a trial runs in a Ray worker, whose source
    would be Ray's worker script."""
    from mlflow.tracking.context.registry import resolve_tags

    found = resolve_tags()
    commit = git_commit()
    if commit:
        found["mlflow.source.git.commit"] = commit
    return {k: redact(str(found[k])) for k in CONTEXT_TAGS if found.get(k)}


def open_experiment(uri: str, experiment: str) -> str:
    """The experiment's id, created if needed; tagged as a model-training experiment (one of
    ours made before the tag existed gets it; a kind someone chose is kept)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return c.create_experiment(
            experiment,
            artifact_location=_artifact_root(uri, experiment),
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    context: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """Create the run for ``run_name``, or reopen the one that already has that name.

    A new run gets ``context`` (default: :func:`context_tags` of this process) under ``tags``.
    Returns (run_id, resumed). Params already logged keep their first value (MLflow
    params are immutable); a changed value is reported, not silently dropped.
    """
    c = client(uri)
    exp_id = open_experiment(uri, experiment)
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
        context = context_tags() if context is None else context
        run_id = c.create_run(exp_id, run_name=run_name, tags={**context, RUN_NAME_TAG: run_name, **tags}).info.run_id
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


def last_steps(uri: str, run_id: str) -> dict[str, int]:
    """The highest step logged for each metric of the run: a worker group that restarts
    (from a checkpoint, or from scratch before its first one) re-runs steps and logs a
    metric only at steps it does not have yet."""
    c = client(uri)
    return {
        key: max((m.step for m in c.get_metric_history(run_id, key)), default=-1)
        for key in c.get_run(run_id).data.metrics
    }


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


def model_requirements(video: bool) -> list[str]:
    """The packages the logged model imports, pinned to the versions installed here (a
    local build tag such as torch's ``+cpu`` dropped: pip would not find it on PyPI).
    MLflow adds itself."""
    from importlib.metadata import version

    names = ["torch", "tokenizers", "numpy", "pandas", "fsspec", "pyyaml"] + (["pyarrow", "av"] if video else [])
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


def log_model(uri: str, run_id: str, bundle: str, video: bool, example: list[str] | None = None) -> str:
    """Log a local model bundle folder as an MLflow "models from code" pyfunc in the run;
    returns the model's URI (``runs:/ID/model``).

    The model is ``serving.py`` (code, not a pickle) with the bundle as its artifact
    ``bundle`` and the ``pipeline`` package as its code, so MLflow's own tools load and
    serve it. ``example``: a few inputs (sentences; clip files for a captioner) saved as
    the input example; MLflow loads the logged model and predicts on it once, a check
    that it serves (a failure there is MLflow's warning, not an error).
    """
    import shutil
    import sys
    import tempfile

    import mlflow
    import mlflow.pyfunc

    from . import serving
    from .inference import BUNDLE_FILES

    with tempfile.TemporaryDirectory(prefix="pipeline-pyfunc-") as tmp:
        # Exactly the bundle's files: a best/ folder may hold others beside them.
        folder = os.path.join(tmp, "bundle")
        os.makedirs(folder)
        for name in BUNDLE_FILES:
            shutil.copyfile(os.path.join(bundle, name), os.path.join(folder, name))
        # MLflow's check of the input example loads the model, which puts the model's code/
        # folder (a temporary copy) first on sys.path for good; put the path back after.
        saved_path = sys.path[:]
        with fluent_store(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=serving.__file__,
                artifacts={"bundle": folder},
                code_paths=[str(Path(__file__).resolve().parent)],
                signature=serving.signature(video),
                input_example=example or None,
                pip_requirements=model_requirements(video),
            )
        sys.path[:] = saved_path
    return info.model_uri


def pickles_in(folder: str | Path) -> list[str]:
    """Files under ``folder`` that are pickles: by name, or by content (a pickle of
    protocol 2-5 starts with 0x80 and the protocol byte). torch's zip format (``PK``) is
    not one; the state dict inside it is read with ``weights_only=True``."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            head = f.read(2)
        if path.suffix in (".pkl", ".pickle", ".pth") or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            found.append(str(path.relative_to(folder)))
    return found


# ---- The registry: every sweep's best a challenger; champion moves only when it is beaten -------

CHAMPION, CHALLENGER = "champion", "challenger"
# Tags on a registered version: what it scored, on which data, from which sweep and commit.
SWEEP_TAG, METRIC_TAG, VALUE_TAG, DATA_TAG, COMMIT_TAG = (
    "pipeline.sweep",
    "pipeline.metric",
    "pipeline.metric_value",
    "pipeline.data_fingerprint",
    "pipeline.git_commit",
)


def data_fingerprint(data_dir: str, manifest: dict[str, Any]) -> str:
    """The test data a score was measured on: the preprocessed folder's name (it hashes the
    data config and the input files) and the test split's kept count."""
    return f"{os.path.basename(data_dir.rstrip('/'))}/test={manifest['splits']['test']['kept']}"


def start_system_metrics(uri: str, run_id: str, node: str, interval_s: float) -> Any:
    """MLflow's system metrics of this machine into ``run_id`` as ``system/<node>/...``, every
    ``interval_s`` seconds, resuming after the run's last system step. Started in a thread of
    its own (asking MLflow for that step must not hold up training when the server is away);
    returns a handle for :func:`stop_system_metrics`."""
    import threading

    # Imported here, not in the thread: a module imported from two threads at once can be seen
    # half-initialised (mlflow's protobuf registry then fails in the training thread).
    import mlflow.tracking
    import mlflow.utils.autologging_utils  # noqa: F401 - what the monitor's constructor imports
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    handle: dict[str, Any] = {}

    def start() -> None:
        try:
            monitor = SystemMetricsMonitor(
                run_id, sampling_interval=interval_s, resume_logging=True, node_id=node, tracking_uri=uri
            )
            monitor.start()
            handle["monitor"] = monitor
        except Exception as e:
            _say(f"[tracking] no system metrics from {node}: {redact(str(e))[:300]}")

    handle["thread"] = threading.Thread(target=start, name=f"system-metrics-{node}", daemon=True)
    handle["thread"].start()
    return handle


def stop_system_metrics(handle: Any, wait_s: float = 10.0) -> None:
    """Stop sampling and log the last samples, waiting ``wait_s`` at most: with the server
    away, MLflow's client would retry for minutes, and the end of training does not wait."""
    import threading

    def finish() -> None:
        handle["thread"].join()
        if "monitor" in handle:
            try:
                handle["monitor"].finish()
            except Exception as e:
                _say(f"[tracking] the last system metrics were not logged: {redact(str(e))[:300]}")

    done = threading.Thread(target=finish, name="system-metrics-finish", daemon=True)
    done.start()
    done.join(wait_s)


def split_datasets(data_dir: str, manifest: dict[str, Any]) -> list[dict[str, str]]:
    """The preprocessed splits as MLflow datasets: source the split's Parquet folder, digest the
    preprocessing hash (the output folder's name ends with it), context the split."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = os.path.basename(data_dir.rstrip("/"))
    out = []
    for split in ("train", "val", "test"):
        if not manifest["splits"].get(split, {}).get("kept"):
            continue
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(f"{data_dir.rstrip('/')}/{split}")
        ds = MetaDataset(source=source, name=f"{name}/{split}", digest=name.rsplit("-", 1)[-1][:36])
        d = ds.to_dict()
        out.append({k: redact(d[k]) for k in ("name", "digest", "source_type", "source")} | {"context": split})
    return out


def register_challenger(uri: str, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register a logged model as a new version of ``name``, tagged, with the alias
    ``challenger``; returns the version."""
    import mlflow

    with fluent_store(uri):
        version = str(mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()}).version)
    client(uri).set_registered_model_alias(name, CHALLENGER, version)
    return version


def _champion(uri: str, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower():
            return None
        raise


def _score(uri: str, mv: Any, metric: str) -> float | None:
    """A version's score on ``metric``: its tag, else (a version registered before tags
    were written) the metric of the run it came from."""
    if mv.tags.get(METRIC_TAG) == metric and mv.tags.get(VALUE_TAG):
        return float(mv.tags[VALUE_TAG])
    if mv.run_id:
        value = client(uri).get_run(mv.run_id).data.metrics.get(metric)
        return None if value is None else float(value)
    return None


def promote_if_better(
    uri: str, name: str, version: str, metric: str, mode: str, data_fingerprint: str
) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` when there is no champion yet, or when the version
    beats the champion on ``metric`` (``mode`` max|min) measured on the same test data
    (``data_fingerprint``). Returns (promoted, the reason in one line)."""
    c = client(uri)
    mv = c.get_model_version(name, version)
    value = _score(uri, mv, metric)
    shown = "no score" if value is None else f"{metric} {value:.2f}"
    champ = _champion(uri, name)
    if champ is None:
        _promote(uri, name, version, f"first champion ({shown})", "pipeline tune")
        return True, f"champion: v{version} ({shown}), the first of {name}"
    if str(champ.version) == str(version):
        return False, f"champion: v{version} already"
    champ_value = _score(uri, champ, metric)
    champ_shown = "no score" if champ_value is None else f"{metric} {champ_value:.2f}"
    kept = f"champion: v{champ.version} ({champ_shown}) kept; challenger v{version} ({shown})"
    hint = f"`pipeline promote {name} {version}` moves it by hand"
    if champ.tags.get(DATA_TAG) != data_fingerprint:
        return False, (
            f"{kept} was tested on other data ({data_fingerprint} vs the champion's "
            f"{champ.tags.get(DATA_TAG, 'unknown')}): not comparable; {hint}"
        )
    if value is None or champ_value is None:
        return False, f"{kept}: without both scores there is nothing to compare; {hint}"
    better = value > champ_value if mode == "max" else value < champ_value
    if not better:
        return False, f"{kept} does not beat it ({'higher' if mode == 'max' else 'lower'} is better)"
    _promote(uri, name, version, f"beat v{champ.version}: {metric} {value:.2f} vs {champ_value:.2f}", "pipeline tune")
    return True, f"champion moved v{champ.version} -> v{version} ({metric} {champ_value:.2f} -> {value:.2f})"


def _promote(uri: str, name: str, version: str, reason: str, by: str) -> None:
    import time

    c = client(uri)
    # Tags first: a champion is never without its why.
    for k, v in {
        "promoted_by": by,
        "promotion_reason": reason,
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }.items():
        c.set_model_version_tag(name, version, k, v)
    c.set_registered_model_alias(name, CHAMPION, version)


def promote(uri: str, name: str, version: str, reason: str, by: str) -> str | None:
    """Move ``champion`` to ``version`` by hand, tagging who and why; returns the version
    that was champion before (None: there was none)."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_model_version(name, version)
    except MlflowException as e:
        try:
            known = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            known = []
        raise TrackingError(
            f"registered model '{name}' has no version {version} at {redact(uri)} "
            f"(versions: {', '.join(map(str, known)) or 'none'})"
        ) from e
    before = _champion(uri, name)
    _promote(uri, name, version, reason, by)
    return None if before is None else str(before.version)


# ---- Buffered logging: an MLflow outage neither stops training nor loses a record ----------

SPILL_FOLDER = "mlflow-unsent"
_HTTP_5XX = re.compile(r"error code (5\d\d)\b")


def is_outage(e: BaseException | None) -> bool:
    """True for the errors of a tracking server that is away (refused or dropped connections,
    timeouts, exhausted retries, HTTP 5xx); False for a request MLflow refused (a bad value),
    which sending again would not fix."""
    import requests
    from mlflow.exceptions import MlflowException, RestException
    from urllib3.exceptions import HTTPError as Urllib3Error

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(
            e,
            (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.RetryError,
                Urllib3Error,
                ConnectionError,
                TimeoutError,
                TrackingError,
            ),
        ):
            return True
        if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code >= 500:
            return True
        if isinstance(e, RestException):
            return e.get_http_status_code() >= 500
        if isinstance(e, MlflowException) and _HTTP_5XX.search(str(e.message)):
            return True  # a 5xx answer without a JSON body (a proxy in front of the server)
        # MLflow raises its wrapper of a failed request inside ``except``: the original is the context.
        e = e.__cause__ or e.__context__
    return False


class RunLogger:
    """Metrics, tags, artifacts and the end of one MLflow run, sent by a background thread.

    Calls queue a record (metrics keep their step and the timestamp of the call) and return
    at once; ``flush()`` wakes the sender, which sends the queue in order (consecutive metrics
    in one ``log_batch``) and drops each record once MLflow has taken it. While the server is
    away the records stay queued and the sender tries again every ``retry_s`` seconds, so a
    training step never waits on MLflow (with MLflow's default retries one attempt can itself
    take minutes: it does so on the sender's thread). A chunk sent again after a failure that
    came past the server's commit holds the same records: a SQL store keeps a metric (key,
    step, timestamp, value) once, tags and artifacts are overwritten, so nothing is logged
    twice. ``close()`` keeps trying for up to ``wait_s`` and writes what is left as JSON lines
    (artifact copies beside them) into ``spill_dir``, for ``pipeline tracking replay``.
    An error that is not an outage (a value MLflow refuses) drops that record and is raised
    in the caller's thread by the next ``flush()`` or ``close()``.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        spill_dir: str,
        who: str = "driver",
        retry_s: float = 10.0,
        records: list[dict[str, Any]] | None = None,
    ):
        import tempfile
        import threading

        self.uri, self.run_id, self.spill_dir, self.who, self.retry_s = uri, run_id, spill_dir, who, retry_s
        self.spilled_to: str | None = None
        self._queue: list[dict[str, Any]] = list(records or [])
        self._floors: dict[str, int] = {}  # metric -> the highest step MLflow already has (skip_logged_steps)
        self._stage = tempfile.mkdtemp(prefix="mlflow-unsent-")  # artifact copies, until sent
        self._cond = threading.Condition()
        self._wanted = self._done = 0  # flush requests made / served by a send pass
        self._closing = self._stop = False
        self._error: BaseException | None = None
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None

    # -- queueing: never waits on MLflow --
    def _put(self, record: dict[str, Any]) -> None:
        with self._cond:
            self._queue.append({"run_id": self.run_id, **record})

    def log_metrics(
        self, values: dict[str, float], step: int, model_id: str | None = None, dataset: dict[str, str] | None = None
    ) -> None:
        """Metrics at ``step``; ``model_id`` and ``dataset`` (its name and digest) link them to
        a logged model and the dataset they were measured on (MLflow 3's model metrics)."""
        import time

        record = {
            "kind": "metrics",
            "step": int(step),
            "timestamp": int(time.time() * 1000),
            "values": {k: float(v) for k, v in values.items()},
        }
        if model_id:
            record["model_id"] = model_id
        if dataset:
            record["dataset"] = {"name": dataset["name"], "digest": dataset["digest"]}
        self._put(record)

    def log_inputs(self, datasets: list[dict[str, str]]) -> None:
        """Dataset inputs of the run (see :func:`split_datasets`): MLflow's Datasets column."""
        self._put({"kind": "inputs", "datasets": datasets})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def _stage_file(self, name: str) -> Path:
        import uuid

        dest = Path(self._stage) / uuid.uuid4().hex / name
        dest.parent.mkdir(parents=True)
        return dest

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A copy is queued: the file may change or go (a temp dir) right after the call."""
        import shutil

        dest = self._stage_file(Path(path).name)
        shutil.copyfile(path, dest)
        self._put({"kind": "artifact", "path": str(dest), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        dest = self._stage_file(Path(artifact_file).name)
        dest.write_text(text)
        self._put_file(dest, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str, dpi: int = 110) -> None:
        """A matplotlib figure as a PNG artifact (as ``MlflowClient.log_figure`` stores it),
        rendered now: the caller may close the figure right after."""
        dest = self._stage_file(Path(artifact_file).name)
        figure.savefig(dest, dpi=dpi)
        self._put_file(dest, artifact_file)

    def _put_file(self, staged: Path, artifact_file: str) -> None:
        folder = str(Path(artifact_file).parent)
        self._put({"kind": "artifact", "path": str(staged), "artifact_path": None if folder == "." else folder})

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """A table in MLflow's table layout (``columns``/``data``); replaces an older one."""
        import json

        cols = list(data)
        self.log_text(
            json.dumps({"columns": cols, "data": [list(r) for r in zip(*(data[c] for c in cols))]}), artifact_file
        )

    def end_run(self, status: str = "FINISHED") -> None:
        self._put({"kind": "end_run", "status": status})

    def skip_logged_steps(self) -> None:
        """Drop each metric queued after this call at the steps MLflow already has for it (up
        to its highest logged step, asked when the server first answers): a restarted worker
        group recomputes the steps after its checkpoint (all of them, when it had none),
        logged once before the failure."""
        self._put({"kind": "skip_logged"})

    def _new(self, key: str, step: int) -> bool:
        return step > self._floors.get(key, -1)

    # -- sending --
    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float = 0.0) -> int:
        """Wake the sender and return at once, or with ``timeout`` > 0 wait up to that long for
        its next pass (which waits out the retry interval while the server is away). Returns
        the number of records still queued."""
        import threading
        import time

        with self._cond:
            self._raise_error()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"mlflow-sender-{self.who}", daemon=True)
                self._thread.start()
            self._wanted += 1
            target = self._wanted
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while self._done < target and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            self._raise_error()
            return len(self._queue)

    def _raise_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._done < self._wanted or self._closing or self._stop)
                if self._stop or (self._closing and not self._queue):
                    return
                target = self._wanted
            ok = self._send_all()
            with self._cond:
                self._done = max(self._done, target)
                self._cond.notify_all()
                if not ok:  # the server is away: one attempt per retry_s, whatever flush() asks
                    self._cond.wait_for(lambda: self._stop, self.retry_s)

    def _send_all(self) -> bool:
        """Send the queue, head first; False when the server is away (the rest kept)."""
        import time

        probe = self.uri.startswith(("http://", "https://"))
        while True:
            with self._cond:
                if not self._queue:
                    return True
                chunk = _next_chunk(self._queue)
            try:
                if probe:
                    # One short probe a pass: MLflow's client retries a call to a server that is
                    # away for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 may not be set where this
                    # runs, e.g. in the workers of a running Ray cluster), and a call still retrying
                    # at close() would spill records that the returned server could have taken.
                    probe = False
                    check_reachable(self.uri, timeout=5.0)
                self._send(chunk)
            except Exception as e:
                if not is_outage(e):
                    with self._cond:
                        self._error = self._error or e
                        del self._queue[: len(chunk)]  # refused now, refused again: it would block the rest
                    continue
                if self._down_since is None:
                    self._down_since = time.time()
                    _say(
                        f"[tracking] MLflow at {redact(self.uri)} is away ({type(e).__name__}): "
                        f"{self.pending} record(s) kept, sent when it answers"
                    )
                return False
            with self._cond:
                del self._queue[: len(chunk)]
            if self._down_since is not None:
                _say(
                    f"[tracking] MLflow at {redact(self.uri)} answers again after "
                    f"{time.time() - self._down_since:.0f} s; sending the kept records"
                )
                self._down_since = None

    def _send(self, chunk: list[dict[str, Any]]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag

        first = chunk[0]
        c = client(self.uri)
        kind, run_id = first["kind"], first["run_id"]
        if kind == "metrics":
            metrics = [
                Metric(
                    k,
                    v,
                    r["timestamp"],
                    r["step"],
                    model_id=r.get("model_id"),
                    dataset_name=r.get("dataset", {}).get("name"),
                    dataset_digest=r.get("dataset", {}).get("digest"),
                )
                for r in chunk
                for k, v in r["values"].items()
                if self._new(k, r["step"])
            ]
            if metrics:
                c.log_batch(run_id, metrics=metrics)
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for r in chunk for k, v in r["tags"].items()])
        elif kind == "artifact":
            c.log_artifact(run_id, first["path"], first["artifact_path"])
        elif kind == "inputs":
            c.log_inputs(
                run_id,
                [
                    DatasetInput(
                        Dataset(d["name"], d["digest"], d["source_type"], d["source"]),
                        [InputTag("mlflow.data.context", d["context"])],
                    )
                    for d in first["datasets"]
                ],
            )
        elif kind == "end_run":
            c.set_terminated(run_id, status=first["status"])
        elif kind == "skip_logged":
            self._floors = last_steps(self.uri, run_id)
        else:
            raise ValueError(f"unknown record kind {kind!r} for run {run_id}")

    # -- the end --
    def close(self, wait_s: float = 15.0) -> int:
        """Send what is queued, trying for up to ``wait_s``; write what is left to a spill file
        under ``spill_dir`` (``spilled_to``) and return how many records it holds (0: all sent)."""
        import shutil

        if self._queue:
            self.flush(0.0)
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(wait_s)
            with self._cond:
                self._stop = True  # a sender still waiting out the server gives up now
                self._cond.notify_all()
        with self._cond:
            left = []
            for r in self._queue:  # metrics MLflow has already are not spilled (a replay would add them)
                if r["kind"] == "metrics":
                    r = {**r, "values": {k: v for k, v in r["values"].items() if self._new(k, r["step"])}}
                    if not r["values"]:
                        continue
                left.append(r)
            self._queue = []
        if left:
            self.spilled_to = write_spill(self.spill_dir, left, self.who, self.uri)
        if self._thread is None or not self._thread.is_alive():  # else its request in flight reads the copies
            shutil.rmtree(self._stage, ignore_errors=True)
        self._raise_error()
        return len(left)

    def unsent_message(self, left: int) -> str:
        return (
            f"[tracking] MLflow at {redact(self.uri)} did not answer: {left} record(s) of run {self.run_id} are "
            f"not logged yet, kept in {self.spilled_to}; send them with: pipeline tracking replay {self.spill_dir}"
        )


def _say(message: str) -> None:
    """Print once: in a Ray Train worker a plain ``print`` from this thread reached the driver
    twice (see ``train.loop.say``); elsewhere ``sys.__stdout__`` is stdout."""
    import sys

    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


def _next_chunk(queue: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The head of the queue that goes in one request: consecutive metrics (up to 1000
    values) or tags (up to 100) of one run; any other record alone."""
    first = queue[0]
    if first["kind"] not in ("metrics", "tags"):
        return queue[:1]
    limit, field = (1000, "values") if first["kind"] == "metrics" else (100, "tags")
    chunk: list[dict[str, Any]] = []
    n = 0
    for r in queue:
        if r["kind"] != first["kind"] or r["run_id"] != first["run_id"] or (chunk and n + len(r[field]) > limit):
            break
        chunk.append(r)
        n += len(r[field])
    return chunk


def spill_dir(storage: str, run_name: str) -> str:
    """Where a run's unsent records go: beside its checkpoints, so they are as durable."""
    return f"{storage.rstrip('/')}/{run_name}/{SPILL_FOLDER}"


def write_spill(folder: str, records: list[dict[str, Any]], who: str, uri: str) -> str:
    """Write records as JSON lines into ``folder`` (local or an fsspec URI), artifacts copied
    to ``files/`` beside them; returns the file's path. Names start with the time, so a
    replay sends older files first."""
    import json
    import time
    import uuid

    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    lines = []
    for r in records:
        if r["kind"] == "artifact":
            rel = f"files/{uuid.uuid4().hex}/{Path(r['path']).name}"
            fs.makedirs(f"{root}/{Path(rel).parent}", exist_ok=True)
            fs.put_file(r["path"], f"{root}/{rel}")
            r = {**r, "path": rel}
        lines.append(json.dumps({**r, "tracking_uri": redact(uri)}) + "\n")
    now = time.time()
    path = f"{root}/{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}-{who}-{os.getpid()}.jsonl"
    with fs.open(path, "w") as f:
        f.write("".join(lines))
    return fs.unstrip_protocol(path) if "://" in folder else path


def replay(path: str, uri: str | None = None) -> tuple[int, int]:
    """Send the records of spill file(s) (a ``.jsonl`` file, or a folder of them), oldest
    file first, to ``uri`` (default: ``MLFLOW_TRACKING_URI``, else the URI in the file). A file
    whose records were all taken is removed with its artifact copies; one with some left
    keeps only those, so replaying again sends nothing twice. Returns (sent, left)."""
    import json
    import shutil
    import tempfile

    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if root.endswith(".jsonl") and fs.isfile(root):
        files, folder = [root], str(Path(root).parent)
    elif fs.isdir(root):
        files, folder = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".jsonl")), root
    else:
        raise FileNotFoundError(f"no spill file or folder at {path}")
    sent = left = 0
    for file in files:
        records = [json.loads(line) for line in fs.cat_file(file).decode().splitlines() if line.strip()]
        if not records:
            fs.rm(file)
            continue
        target = uri or os.environ.get("MLFLOW_TRACKING_URI") or records[0]["tracking_uri"]
        if "***" in target:
            raise TrackingError(
                f"{file} was written for {target}: give the tracking URI with its password "
                "in MLFLOW_TRACKING_URI or --tracking-uri"
            )
        local = tempfile.mkdtemp(prefix="mlflow-replay-")
        try:
            spilled: dict[str, str] = {}  # local copy -> its path in the spill folder
            for r in records:
                if r["kind"] == "artifact":
                    dest = Path(local) / r["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(f"{folder}/{r['path']}", str(dest))
                    spilled[str(dest)], r["path"] = r["path"], str(dest)
            rest: list[dict[str, Any]] = []
            error: BaseException | None = None
            for run_id in dict.fromkeys(r["run_id"] for r in records):
                log = RunLogger(
                    target, run_id, folder, who="replay", records=[r for r in records if r["run_id"] == run_id]
                )
                log._send_all()  # in this thread: a replay may wait on MLflow
                rest += log._queue
                error = error or log._error
                shutil.rmtree(log._stage, ignore_errors=True)
            sent, left = sent + len(records) - len(rest), left + len(rest)
            kept = {spilled[r["path"]] for r in rest if r["kind"] == "artifact"}
            for copy in set(spilled.values()) - kept:
                fs.rm(f"{folder}/{Path(copy).parent}", recursive=True)
            if rest:
                with fs.open(file, "w") as f:
                    f.write(
                        "".join(
                            json.dumps({**r, "path": spilled[r["path"]]} if r["kind"] == "artifact" else r) + "\n"
                            for r in rest
                        )
                    )
            else:
                fs.rm(file)
            if error is not None:
                raise error
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return sent, left
