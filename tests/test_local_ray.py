"""The local Ray that `pipeline` starts: loopback only, token auth on, and a config that
cannot fit it refused before any preprocessing. On the session's real local Ray."""

import ipaddress
import os
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.config import ConfigError, load_config


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket bound to IPv4 loopback
    return (mapped or addr).is_loopback


def _listening(pids: set[int]) -> list[tuple[str, int, int, str]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            out.append((c.laddr.ip, c.laddr.port, c.pid, name))
    return out


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(ray_session):
    ray = ray_session
    ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process is up and serving too
    node = ray._private.worker._global_node
    pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = _listening(pids)
    ports = {port for _, port, _, _ in sockets}
    # The scan found the cluster's servers: the GCS and the dashboard are among them.
    assert int(node.gcs_address.rsplit(":", 1)[1]) in ports, sockets
    assert int(node.webui_url.rsplit(":", 1)[1]) in ports, sockets
    assert len({pid for _, _, pid, _ in sockets}) >= 4, sockets  # driver, GCS, raylet, agents, workers
    exposed = [s for s in sockets if not _is_loopback(s[0])]
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    assert node.node_ip_address == "127.0.0.1"


@pytest.mark.slow
def test_local_ray_requires_the_token(ray_session):
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    node = ray_session._private.worker._global_node
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).read_text().strip()

    def dashboard(headers):
        req = urllib.request.Request(f"http://{node.webui_url}/api/version", headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    assert dashboard({}) == 401
    assert dashboard({"Authorization": "Bearer not-the-token"}) in (401, 403)
    assert dashboard({"Authorization": f"Bearer {token}"}) == 200

    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(node.gcs_address))

    def gcs(metadata):
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    assert gcs([]) == grpc.StatusCode.UNAUTHENTICATED
    assert gcs([("authorization", "Bearer not-the-token")]) == grpc.StatusCode.UNAUTHENTICATED
    assert gcs([("authorization", f"Bearer {token}")]) == grpc.StatusCode.OK


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_fail_before_preprocessing(ray_session, tmp_path):
    from pipeline.train.run import prepare

    cfg = load_config(
        [
            "data=demo_text",
            f"data.root={tmp_path}/demo",
            f"data.output_dir={tmp_path}/data",
            f"train.storage_path={tmp_path}/ray",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
            "train.num_workers=64",
        ]
    )
    cpus = ray_session.cluster_resources()["CPU"]
    with pytest.raises(ConfigError) as e:
        prepare(cfg)
    assert str(e.value).startswith(
        f"this cluster has {cpus:g} CPUs; train.num_workers=64 x train.cpus_per_worker=1 needs 64"
    ), str(e.value)
    assert not (tmp_path / "demo").exists() and not (tmp_path / "data").exists()  # nothing generated or read
    gpu = load_config(
        [
            f"train.storage_path={tmp_path}/ray",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
            "train.num_workers=1",
            "train.use_gpu=true",
            "train.gpus_per_worker=2",
        ]
    )
    if ray_session.cluster_resources().get("GPU", 0) < 2:
        with pytest.raises(ConfigError, match=r"GPUs; train.num_workers=1 x train.gpus_per_worker=2 needs 2"):
            prepare(gpu)


@pytest.mark.slow
def test_a_small_split_is_read_into_memory_once_and_a_large_one_streams(ray_session, tmp_path):
    """train.in_memory_mb: a split at most that size on disk is read by the driver into the
    object store in blocks (epochs and validations then stream from it, no read of storage
    each), a larger one stays a lazy read; every row is there either way."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.dataset import MaterializedDataset

    from pipeline.config import TrainConfig
    from pipeline.train.run import split_dataset

    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    for i in range(2):  # about 2 MiB of incompressible bytes in two files
        ids = rng.integers(0, 2**31, size=(1000, 128), dtype=np.int64)
        table = pa.table({"id": np.arange(i * 1000, (i + 1) * 1000), "src": list(ids)})
        pq.write_table(table, tmp_path / "train" / f"part-{i}.parquet", compression="none")
    for mib, materialized in ((0, False), (1, False), (4, True)):
        ds = split_dataset(str(tmp_path), "train", 2000, TrainConfig(num_workers=2, in_memory_mb=mib))
        assert isinstance(ds, MaterializedDataset) is materialized, mib
        if materialized:  # read here, in blocks of rows_per_block(2000, 2) = 125: 16, a share for each worker
            assert ds.num_blocks() == 16
        assert sorted(r["id"] for r in ds.select_columns(["id"]).take_all()) == list(range(2000))


def test_a_small_split_is_put_in_the_object_store_while_workers_hold_every_cpu(ray_session, tmp_path):
    """A sweep's next trial prepares its splits while other trials' workers hold the CPUs:
    the in-memory split needs no task (``from_arrow`` waited for a whole CPU per block to
    count its rows, so the trial stalled until a CPU was free)."""
    import concurrent.futures

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.config import TrainConfig
    from pipeline.train.run import split_dataset

    (tmp_path / "val").mkdir()
    pq.write_table(pa.table({"id": list(range(300))}), tmp_path / "val" / "part-0.parquet")
    held = placement_group([{"CPU": ray_session.available_resources()["CPU"]}])
    assert held.wait(60), "could not take the free CPUs"
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        put = pool.submit(split_dataset, str(tmp_path), "val", 300, TrainConfig(num_workers=2))
        ds = put.result(timeout=30)  # raises TimeoutError where it waits for a CPU
        assert ds.count() == 300 and ds.num_blocks() == 5  # rows_per_block(300, 2) = 64
    finally:
        remove_placement_group(held)
        pool.shutdown(wait=True)
    assert sorted(r["id"] for r in ds.take_all()) == list(range(300))


def test_auto_cpus_per_worker_shares_the_local_cores_and_is_one_elsewhere(monkeypatch):
    """train.cpus_per_worker=0 (the default): on the local Ray of one run the cores are shared
    among the workers (1 worker on 2 cores had 1 thread: 0.54x a bare loop on both); a job on a
    cluster, a sweep's trials and GPU workers hold 1; a value set is kept everywhere."""
    from pipeline import cluster
    from pipeline.config import TrainConfig
    from pipeline.tune import concurrent_trials

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def cpus(cores: int, sweep: bool = False, **train) -> int:
        monkeypatch.setattr(cluster, "local_cores", lambda: cores)
        t = TrainConfig(**train)
        got = cluster.resolve_worker_cpus(t, sweep=sweep)
        assert t.cpus_per_worker == got  # resolved in the config: MLflow's params and the workers see it
        return got

    assert TrainConfig().cpus_per_worker == 0
    assert [cpus(2, num_workers=1), cpus(2, num_workers=2), cpus(2, num_workers=3)] == [2, 1, 1]
    assert [cpus(16, num_workers=4), cpus(16, num_workers=3), cpus(16, num_workers=1, min_workers=1)] == [4, 5, 16]
    assert cpus(16, num_workers=2, use_gpu=True) == 1
    assert cpus(16, sweep=True, num_workers=1) == 1
    assert cpus(2, num_workers=1, cpus_per_worker=3) == 3 and cpus(2, sweep=True, cpus_per_worker=2) == 2
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert cpus(16, num_workers=2) == 1
    # A sweep's concurrency counts its trials' resolved CPUs: 1 per worker with auto.
    sweep = load_config(["train.num_workers=1", "tune.max_concurrent_trials=0"])
    assert concurrent_trials(sweep, now={"CPU": 9.0}, most={}) == 7  # (9 - 1) // (1 x 1 + 0.01 driver)
