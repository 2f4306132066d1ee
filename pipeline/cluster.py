"""Ray clusters: job submission through the Ray Jobs SDK, and the checks a multi-node
cluster needs before training (storage every node can see, a shared MLflow store).

``pipeline submit -- train data=... `` sends the project (code and ``conf/``) as the job's
``working_dir`` with the MLflow variables, ``PIPELINE_DURABLE_ROOT`` and the git commit as
environment variables, and MLflow credentials by name only; Ray's token authentication stays
on (the token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``,
never from the command line). In the job, :func:`prepare_job` puts the relative paths it keeps
under ``PIPELINE_DURABLE_ROOT`` (Ray deletes the job's working folder) and checks that the
cluster has the credentials the submitter named.

``RAY_ADDRESS`` names the cluster as Ray's own tools do: ``pipeline submit``/``jobs`` take its
dashboard URL (``http://HEAD:8265``, as ``ray job submit``), the commands that run Ray join
it at its GCS address (``HEAD:6379``, as ``ray.init``; Ray sets that one inside a job).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from . import console, tracking


def _token_auth_env() -> None:
    """Job clients of a token-auth cluster need RAY_AUTH_MODE=token before Ray is
    imported (Ray reads it once): turn it on whenever a token is at hand. Only the
    submit/jobs commands call this, first thing; the token itself is never printed."""
    token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_path.exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never upload these with the job: history, environments, data, local stores, caches.
# gitignore syntax: a leading "/" anchors at the project root (conf/data/ must travel).
EXCLUDES = [
    "/.git",
    "/.venv",
    "/data",
    "/artifacts",
    "/ray_results",
    "/mlruns",
    "/mlartifacts",
    "/mlflow.db",
    "/reports",
    "/outputs",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "/.devwhl",
    "/.whl",
    "*.egg-info",
]


class ClusterError(RuntimeError):
    """The cluster cannot run the job as configured; the message says what to change."""


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if not address.startswith(("http://", "https://")):
        address = "http://" + address
    return address


def _client(address: str | None):
    _token_auth_env()
    from ray.job_submission import JobSubmissionClient

    address = _address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {tracking.redact(address)}: {e}. pipeline submit and "
            "pipeline jobs talk to the dashboard's Jobs API (http://HEAD:8265, the dashboard URL `ray start "
            "--head` prints), not to the GCS address HEAD:6379 that pipeline train joins"
        ) from e


# Ray shows a job's entrypoint and its runtime_env, env_vars included, to anyone who can see
# the cluster (dashboard, `ray job list`, the job's metadata): a secret there is a secret leaked.
SECRET_HINT = (
    "Ray shows a job's entrypoint and environment on its dashboard and in `ray job list`. Give "
    "the cluster its credentials instead: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
    "(or MLFLOW_TRACKING_TOKEN) for MLflow, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the pods' "
    "service account for object stores, set on the Ray pods from a Kubernetes Secret"
)


DURABLE_ROOT = "PIPELINE_DURABLE_ROOT"
# MLflow's credential variables: a job gets their names, never their values (see job_spec).
CREDENTIALS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
CREDENTIALS_BY_NAME = "PIPELINE_CREDENTIALS_BY_NAME"
STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", DURABLE_ROOT)


def job_spec(command: list[str]) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime_env that run ``pipeline <command>`` as a job. Refused
    (ClusterError) when an argument or a forwarded variable holds a secret (``tracking.redact``
    would change it): the real value has no way to the job that Ray would not show. MLflow
    credentials set here travel by name only (``PIPELINE_CREDENTIALS_BY_NAME``): the cluster's
    nodes hold the values, and the job checks they are there (:func:`prepare_job`)."""
    from .config import CONF_DIR

    conf = CONF_DIR.resolve()
    if not conf.is_relative_to(PROJECT_ROOT):
        raise ClusterError(
            f"PIPELINE_CONF_DIR={conf} is outside the project folder that pipeline submit uploads "
            f"({PROJECT_ROOT}): the job could not read it. Move it into the project or unset PIPELINE_CONF_DIR"
        )
    env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    for arg in command:
        if tracking.redact(arg) != arg:
            raise ClusterError(
                f"pipeline submit: '{tracking.redact(arg)}' holds a secret, and would be shown with "
                f"the job. {SECRET_HINT}"
            )
    for key, value in env.items():
        if tracking.redact(value) != value:
            raise ClusterError(
                f"pipeline submit: {key}={tracking.redact(value)} holds a secret, and would be shown "
                f"with the job. {SECRET_HINT}"
            )
    # The uploaded conf/, relative to the job's working folder, over any the image sets
    # (the Dockerfile's PIPELINE_CONF_DIR=/app/conf): the job runs the code and options sent.
    env["PIPELINE_CONF_DIR"] = str(conf.relative_to(PROJECT_ROOT))
    names = [k for k in CREDENTIALS if os.environ.get(k)]
    if names:
        env[CREDENTIALS_BY_NAME] = ",".join(names)
    commit = tracking.git_commit()
    if commit:
        env["PIPELINE_GIT_COMMIT"] = commit
    # `pipeline jobs stop` (Ray's stop_job) sends SIGTERM, then SIGKILL after this many seconds
    # (Ray's default: 3). The driver ends a run stopped so as Ctrl-C does (the workers aborted,
    # the MLflow run KILLED, the lock released), which takes longer than 3 s.
    env[STOP_WAIT] = os.environ.get(STOP_WAIT) or "60"
    entrypoint = "python -m pipeline.cli " + shlex.join(command)
    return entrypoint, {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env}


def submit(command: list[str], address: str | None = None, wait: bool = True) -> int:
    """Submit ``pipeline <command>`` as a Ray job; with ``wait``, stream its logs and
    return 0 when it succeeded, 1 otherwise."""
    if not command:
        raise ClusterError("nothing to submit: pipeline submit -- train data=demo_text ...")
    if command[0] == "pipeline":
        command = command[1:]
    entrypoint, runtime_env = job_spec(command)  # before the cluster is asked anything
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"pipeline-{command[0]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        runtime_env=runtime_env,
        metadata={"pipeline.command": command[0]},
    )
    print(f"submitted job {job_id} to {tracking.redact(_address(address))}: {entrypoint}", flush=True)
    sent = ", ".join(k for k in runtime_env["env_vars"] if k != CREDENTIALS_BY_NAME)
    print(f"job environment: {sent}", flush=True)
    if CREDENTIALS_BY_NAME in runtime_env["env_vars"]:
        print(
            f"credentials by name only: {runtime_env['env_vars'][CREDENTIALS_BY_NAME]} (the cluster's "
            "nodes must have them; their values are not sent)",
            flush=True,
        )
    if not wait:
        print(f"follow it: pipeline jobs logs {job_id}   status: pipeline jobs status {job_id}")
        return 0
    return _follow(client, job_id, address)


def _follow(client: Any, job_id: str, address: str | None = None) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded. Ctrl-C stops following, not
    the job (as ``ray job submit`` does): the way to its logs and to stopping it is printed."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
        status = client.get_job_status(job_id)
        while not status.is_terminal():
            time.sleep(1)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        at = f" --address {tracking.redact(address)}" if address else ""
        print(
            f"\nstopped following job {job_id}; it goes on on the cluster. "
            f"Its logs: pipeline jobs logs {job_id}{at}   stop it: pipeline jobs stop {job_id}{at}",
            file=sys.stderr,
            flush=True,
        )
        return 130
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status.value == "SUCCEEDED" else 1


def jobs(action: str, job_id: str, address: str | None = None) -> int:
    client = _client(address)
    if action == "status":
        info = client.get_job_info(job_id)
        print(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if action == "logs":
        print(client.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        print(f"{job_id}: stop {'requested' if client.stop_job(job_id) else 'not needed (already ended)'}")
        return 0
    raise ClusterError(f"unknown jobs action '{action}' (status, logs, stop)")


def job_working_dir() -> Path | None:
    """The temporary folder this process runs in when it is a Ray job's driver with an uploaded
    ``working_dir``: Ray unpacks it under ``<temp>/session_*/runtime_resources/working_dir_files/``
    (``ray._private.runtime_env.working_dir``) and deletes it once the job is over. None elsewhere,
    a ``local://`` working dir included (the node's own folder, which Ray leaves alone)."""
    try:
        cwd = Path.cwd()
    except FileNotFoundError as e:
        raise ClusterError(
            "the folder this process runs in was deleted under it: a Ray job's working folder goes when "
            "Ray counts the job as over on that node (seen with two nodes sharing one Ray temp dir, "
            "which separate machines never do), and nothing relative to it can be read or written"
        ) from e
    parts = cwd.parts
    inside = any(parts[i : i + 2] == ("runtime_resources", "working_dir_files") for i in range(len(parts)))
    return cwd if inside else None


def _kept_paths(cfg: Any) -> dict[str, str]:
    """The keys naming places a run writes and keeps (checkpoints, the bundle, preprocessed data,
    caches, the MLflow store), with their values. Inputs are not here: read from the uploaded
    project, which each node of a job unpacks at the same path, they may stay relative."""
    from .config import VIDEO_DATA

    d, t = cfg.data, cfg.train
    keys = {"train.storage_path": t.storage_path, "data.output_dir": d.output_dir}
    if d.name in ("demo_text", "demo_video"):
        keys["data.root"] = d.root  # the demo corpus is generated there
    if d.name in VIDEO_DATA and d.feature_cache:
        keys["data.feature_cache"] = d.feature_cache
    if t.trace_examples:
        keys["train.trace_examples"] = t.trace_examples
    return keys


def _sqlite_in(folder: Path, cfg: Any) -> tuple[str, str] | None:
    """(the key or variable that set it, its path relative to ``folder``) when the MLflow store
    is a SQLite file given by a relative path, i.e. inside ``folder``."""
    uri, _ = tracking.resolve(cfg.tracking)  # relative SQLite paths come back absolute, in the cwd
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    if not db.is_relative_to(folder):
        return None
    if cfg.tracking.tracking_uri:
        key = "tracking.tracking_uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        key = "MLFLOW_TRACKING_URI"
    else:
        key = "tracking.tracking_uri (default sqlite:///mlflow.db)"
    return key, str(db.relative_to(folder))


def prepare_job(cfg: Any = None, paths: dict[str, str] | None = None) -> dict[str, str]:
    """What a submitted job checks and fixes before any work, in one error naming every problem:

    - the MLflow credentials the submitter named (``PIPELINE_CREDENTIALS_BY_NAME``) must be in
      this process's environment, i.e. on the cluster's nodes;
    - in Ray's temporary working folder (:func:`job_working_dir`), every relative path the job
      writes and keeps goes under ``PIPELINE_DURABLE_ROOT``, each move printed; without it the
      job is refused, naming the keys. Nothing it keeps is left where Ray deletes it.

    ``paths``: outputs a command names outside the config (``{"report --out": "reports/S"}``),
    returned as they are to be used. Outside a job nothing changes."""
    from .config import CONF_DIR, ConfigError

    paths = dict(paths or {})
    problems = []
    named = [n for n in os.environ.get(CREDENTIALS_BY_NAME, "").split(",") if n]
    missing = [n for n in named if not os.environ.get(n)]
    if missing:
        problems.append(
            f"{', '.join(missing)} set where this job was submitted, but not on this cluster: pipeline submit "
            "sends MLflow credentials by name only (Ray shows a job's environment on its dashboard). Give the "
            "cluster's nodes their values: in the environment `ray start` runs in on every node, or on "
            "KubeRay from a Secret (k8s/README.md)"
        )
    where = job_working_dir() if cfg is not None else None
    if where is not None:
        print(
            f"job: working folder {where} (Ray deletes it after the job); config options from {CONF_DIR}",
            file=sys.stderr,
        )
        kept = {**_kept_paths(cfg), **paths}
        relative = {k: v for k, v in kept.items() if "://" not in v and not Path(v).expanduser().is_absolute()}
        sqlite = _sqlite_in(where, cfg)
        root = os.environ.get(DURABLE_ROOT, "")
        if root and "://" not in root and not Path(root).is_absolute():
            problems.append(f"{DURABLE_ROOT}={root} must be an absolute path or a URI (s3://bucket/path)")
        elif relative or sqlite:
            if not root:
                listed = [f"{k}={tracking.redact(v)}" for k, v in relative.items()]
                listed += [f"{sqlite[0]}=sqlite:///{sqlite[1]}"] if sqlite else []
                problems.append(
                    f"relative paths in a job land in Ray's temporary working folder, deleted after the job: "
                    f"{', '.join(listed)}. Give each an absolute path on storage every node sees "
                    f"(train.storage_path=/mnt/shared/ray_results, a tracking server for MLflow), or set "
                    f"{DURABLE_ROOT} (on the cluster's nodes, or where you run pipeline submit, which "
                    "forwards it) to put relative paths under it"
                )
            else:
                for key, value in relative.items():
                    moved = f"{root.rstrip('/')}/{os.path.normpath(value)}"
                    if key in paths:
                        paths[key] = moved
                    else:
                        group, name = key.split(".")
                        setattr(getattr(cfg, group), name, moved)
                    print(f"job: {key}={value} -> {tracking.redact(moved)} ({DURABLE_ROOT})", file=sys.stderr)
                if sqlite and "://" in root:
                    problems.append(
                        f"{sqlite[0]}: a SQLite MLflow store needs a local file, and {DURABLE_ROOT} is "
                        f"{tracking.redact(root)}: use a tracking server (MLFLOW_TRACKING_URI=http://...)"
                    )
                elif sqlite:
                    cfg.tracking.tracking_uri = f"sqlite:///{root.rstrip('/')}/{sqlite[1]}"
                    print(f"job: {sqlite[0]} -> {cfg.tracking.tracking_uri} ({DURABLE_ROOT})", file=sys.stderr)
    if problems:
        raise ConfigError("this job cannot run as submitted: " + "; and ".join(problems))
    return paths


def check_fits(train: Any) -> None:
    """The training workers must fit the cluster: refused now, not after preprocessing,
    when ``num_workers`` x the per-worker CPUs (and GPUs) exceed what the cluster has.
    The figure is ``ray.cluster_resources()``, the nodes alive now: an autoscaling cluster
    that has not started its nodes yet counts only the ones it has."""
    import ray

    from .config import ConfigError

    res = ray.cluster_resources()
    wanted = [("CPU", "cpus_per_worker", train.cpus_per_worker)]
    if train.use_gpu:
        wanted.append(("GPU", "gpus_per_worker", train.gpus_per_worker))
    # An elastic run starts once its minimum fits and grows when nodes come.
    workers_key, workers = (
        ("train.min_workers", train.min_workers) if train.min_workers else ("train.num_workers", train.num_workers)
    )
    for kind, key, per_worker in wanted:
        need, have = workers * per_worker, res.get(kind, 0)
        if need > have:
            raise ConfigError(
                f"this cluster has {have:g} {kind}s; {workers_key}={workers} x "
                f"train.{key}={per_worker:g} needs {need:g}: lower {workers_key} or "
                f"train.{key}, or use a bigger cluster"
            )


def _can_see(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def check_multi_node(storage: str, data_output: str, tracking_uri: str) -> None:
    """On a cluster of several nodes, every path the workers read or write must be
    visible from every node, and MLflow must not be a node-local SQLite file."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        raise ClusterError(
            f"this Ray cluster has {len(nodes)} nodes but MLflow is the node-local store "
            f"{tracking.redact(tracking_uri)}: use a tracking server (MLFLOW_TRACKING_URI=http://...)"
        )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for key, path in (("train.storage_path", storage), ("data.output_dir", data_output)):
        if "://" in path and not path.startswith("file://"):
            continue  # object stores (s3://, gs://, ...) are shared by construction
        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.shared-probe-{uuid.uuid4().hex}"
        fs.touch(probe)
        try:
            can_see = ray.remote(num_cpus=0)(_can_see)
            seen = ray.get(
                [
                    can_see.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                        probe
                    )
                    for n in nodes
                ]
            )
        finally:
            fs.rm(probe)
        blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
        if blind:
            raise ClusterError(
                f"{key}={path} is not shared storage: node(s) {', '.join(blind)} cannot see it. "
                f"On a multi-node cluster use a shared mount (NFS) or a URI such as s3://bucket/path"
            )


def local_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_worker_cpus(train: Any, sweep: bool = False) -> int:
    """Set ``train.cpus_per_worker`` (the CPUs a worker holds and its torch threads) when it
    is 0 (auto) and return it: on the local Ray that pipeline starts for one run, the cores
    shared among the workers (1 worker on 2 cores trains with 2 threads); 1 on a cluster
    (``RAY_ADDRESS``: its nodes are not this machine), for a sweep's trials (they share the
    cores) and for GPU workers. The local Ray keeps 2 logical CPUs above the workers' for Ray
    Data (init_ray)."""
    if not train.cpus_per_worker:
        local = not (sweep or train.use_gpu or os.environ.get("RAY_ADDRESS"))
        train.cpus_per_worker = max(1, local_cores() // max(1, train.num_workers)) if local else 1
    return train.cpus_per_worker


def init_ray(min_cpus: int = 1) -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray (once per process).

    The local Ray is for this machine only: every Ray process listens on 127.0.0.1, and
    token authentication is on (the token is ``~/.ray/auth_token``, made on first use and
    never printed)."""
    import ray  # not at the top: the job commands set RAY_AUTH_MODE before Ray is imported

    # Checked first, also in a process already joined: the variable means one thing everywhere.
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"RAY_ADDRESS={tracking.redact(address)} is a dashboard (Jobs API) address, which pipeline submit "
            "and pipeline jobs use. Commands that run Ray join a cluster at its GCS address (RAY_ADDRESS=HEAD:6379, "
            "or auto on one of its nodes); or run this command as a job: pipeline submit -- COMMAND ..."
        )
    if ray.is_initialized():
        return
    if address:
        with _loopback_node(_loopback_only(address)):
            ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs above the training workers' share leave room for Ray Data's tasks
        # (whole-CPU file listing) and a sweep's trial drivers; without them, workers
        # holding every CPU would starve their own input. Never more than the cores + 2:
        # a request for more workers than this machine can run is refused (check_fits),
        # not granted as an oversubscribed local cluster.
        cores = local_cores()
        _start_local_ray(max(cores, min(min_cpus, cores) + 2))
    sigterm_as_ctrl_c()
    ray.data.DataContext.get_current().enable_progress_bars = False
    console.attach_ray()  # worker output through our router: our lines shown, Ray's to the run's log


def sigterm_as_ctrl_c() -> Any:
    """From now on a SIGTERM (``pipeline jobs stop``, Kubernetes deleting a pod, ``kill``) ends
    this program as a Ctrl-C does: a run's workers aborted by Ray Train, the run KILLED, its
    lock released and the way to go on printed; a sweep saved by Tune and KILLED; exit 130.
    ``ray.init`` puts its own handler in place (``sys.exit``: a sweep then died with its MLflow
    runs RUNNING), so :func:`init_ray` calls this again after it. The handler calls what handles
    SIGINT at that moment rather than sending SIGINT, which a Ray job's driver has blocked.
    Returns the handler it replaced (None outside the main thread, where nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _sigterm_handler)


def _sigterm_handler(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored, as in a shell's background job
        raise KeyboardInterrupt


@contextlib.contextmanager
def _loopback_node(on: bool) -> Iterator[None]:
    """Ray's single-node mode while ``ray.init`` runs (see _start_local_ray): the node's
    address stays 127.0.0.1 instead of being turned into the machine's routable one."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    if on:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _loopback_only(address: str) -> bool:
    """A RAY_ADDRESS on loopback whose GCS answers there but not on the machine's routable
    address: a local Ray that pipeline started (bound to 127.0.0.1). Ray would rewrite the
    address to the routable one and never reach it. A cluster from ``ray start`` listens on
    every interface and is joined as Ray does by default."""
    import socket

    from ray._private.services import node_ip_address_from_perspective

    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return False

    def answers(ip: str) -> bool:
        try:
            with socket.create_connection((ip, int(port)), timeout=1):
                return True
        except OSError:
            return False

    return answers("127.0.0.1") and not answers(node_ip_address_from_perspective())


def _start_local_ray(num_cpus: int) -> None:
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode and mode.lower() != "token":
        raise ClusterError(
            f"RAY_AUTH_MODE={mode}: pipeline starts its local Ray with token authentication only; "
            "unset RAY_AUTH_MODE (or set it to token)"
        )
    # Ray 2.60's ray.init turns a loopback _node_ip_address into the machine's routable
    # address (services.resolve_ip_for_localhost), and the GCS, raylet, object manager,
    # workers and agents then listen on all interfaces. With "clusters" off, the mode Ray
    # itself uses on macOS and Windows, the node address stays 127.0.0.1 and every process
    # binds there. Off only while this node starts: ray.init reads it, nothing after does.
    with _loopback_node(True):
        # The dashboard serves Ray's state API, which Ray Train's cleanup polls; 127.0.0.1 only.
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", log_to_driver=True)
    if not is_token_auth_enabled():  # Ray turns it on for a new local cluster; make sure it did
        ray.shutdown()
        raise ClusterError("the local Ray started without token authentication; set RAY_AUTH_MODE=token")


def storage_uri(path: str) -> str:
    """Ray needs an absolute local path or a URI; check it can be written now, not later."""
    uri = path if "://" in path else str(Path(path).expanduser().resolve())
    fs, root = fsspec.core.url_to_fs(uri)
    probe = f"{root}/.write-probe-{os.getpid()}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        raise PermissionError(f"train.storage_path '{path}' cannot be written: {e}") from e
    return uri
