"""Preflight checks: what a run needs, checked in seconds before anything starts.

``pipeline doctor [key=value ...]`` reports each check (Ray reachable and its resources,
GPUs when the config asks for them, storage writable, MLflow reachable, data readable)
as ok / FAIL with the reason, and exits non-zero when one fails. ``train``, ``tune`` and
``submit`` run the same storage, MLflow and data checks first (``prepare``), so a
bad path or an unreachable server fails before the cluster spends time on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import Config


def check_data(cfg: Config) -> str:
    """The inputs exist and list (no decoding, no reading of whole files)."""
    if cfg.data.name in ("demo_text", "demo_video"):
        return f"{cfg.data.name}: generated on first use under {cfg.data.root}"
    from .tasks import task_for

    return task_for(cfg).check_inputs(cfg.data)


def check_ray(cfg: Config) -> str:
    import ray

    from .cluster import init_ray, resolve_worker_cpus

    init_ray(cfg.train.num_workers * resolve_worker_cpus(cfg.train))
    res = ray.cluster_resources()
    cpus, gpus, nodes = res.get("CPU", 0), res.get("GPU", 0), len([n for n in ray.nodes() if n["Alive"]])
    t = cfg.train
    need_cpu = t.num_workers * t.cpus_per_worker
    if cpus < need_cpu:
        raise RuntimeError(f"{cpus:g} CPUs in the cluster, train.num_workers x train.cpus_per_worker needs {need_cpu}")
    if t.use_gpu and gpus < t.num_workers * t.gpus_per_worker:
        raise RuntimeError(
            f"train.use_gpu=true needs {t.num_workers * t.gpus_per_worker:g} GPUs; the cluster has {gpus:g}"
        )
    return f"{nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs"


def check_storage(cfg: Config) -> str:
    from .cluster import storage_uri

    return f"{storage_uri(cfg.train.storage_path)} is writable"


def check_mlflow(cfg: Config) -> str:
    from . import tracking

    uri, experiment = tracking.resolve(cfg.tracking)
    tracking.check_reachable(uri)
    return f"{tracking.redact(uri)} reachable (experiment '{experiment}')"


CHECKS: list[tuple[str, Callable[[Config], str]]] = [
    ("data", check_data),
    ("storage", check_storage),
    ("mlflow", check_mlflow),
    ("ray", check_ray),
]


def doctor(cfg: Config, print_fn: Callable[[str], Any] = print) -> bool:
    from .tracking import redact  # the lines quote paths and URIs, which may hold credentials

    ok = True
    for name, check in CHECKS:
        try:
            print_fn(redact(f"ok    {name:<8} {check(cfg)}"))
        except Exception as e:
            ok = False
            print_fn(redact(f"FAIL  {name:<8} {type(e).__name__}: {e}"))
    return ok
