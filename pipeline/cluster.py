"""Ray clusters: job submission through the Ray Jobs SDK, and the checks a multi-node
cluster needs before training (storage every node can see, a shared MLflow store).

``pipeline submit -- train data=... `` sends the project as the job's ``working_dir``
with the MLflow variables and the git commit as environment variables; Ray's token
authentication stays on (the token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``, never from the command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from . import tracking


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
        raise ClusterError(f"cannot reach the Ray cluster at {tracking.redact(address)}: {e}") from e


# Ray shows a job's entrypoint and its runtime_env, env_vars included, to anyone who can see
# the cluster (dashboard, `ray job list`, the job's metadata): a secret there is a secret leaked.
SECRET_HINT = (
    "Ray shows a job's entrypoint and environment on its dashboard and in `ray job list`. Give "
    "the cluster its credentials instead: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
    "(or MLFLOW_TRACKING_TOKEN) for MLflow, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the pods' "
    "service account for object stores, set on the Ray pods from a Kubernetes Secret"
)


def job_spec(command: list[str]) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime_env that run ``pipeline <command>`` as a job. Refused
    (ClusterError) when an argument or a forwarded variable holds a secret (``tracking.redact``
    would change it): the real value has no way to the job that Ray would not show."""
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME") if os.environ.get(k)}
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
    commit = tracking.git_commit()
    if commit:
        env["PIPELINE_GIT_COMMIT"] = commit
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
    if not wait:
        print(f"follow it: pipeline jobs logs {job_id}   status: pipeline jobs status {job_id}")
        return 0
    return _follow(client, job_id)


def _follow(client: Any, job_id: str) -> int:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(1)
        status = client.get_job_status(job_id)
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


def init_ray(min_cpus: int = 1) -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray (once per process).

    The local Ray is for this machine only: every Ray process listens on 127.0.0.1, and
    token authentication is on (the token is ``~/.ray/auth_token``, made on first use and
    never printed)."""
    import ray  # not at the top: the job commands set RAY_AUTH_MODE before Ray is imported

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        with _loopback_node(_loopback_only(address)):
            ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs above the training workers' share leave room for Ray Data's tasks
        # (whole-CPU file listing) and a sweep's trial drivers; without them, workers
        # holding every CPU would starve their own input. Never more than the cores + 2:
        # a request for more workers than this machine can run is refused (check_fits),
        # not granted as an oversubscribed local cluster.
        cores = os.cpu_count() or 1
        _start_local_ray(max(cores, min(min_cpus, cores) + 2))
    ray.data.DataContext.get_current().enable_progress_bars = False


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
