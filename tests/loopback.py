"""Test and benchmark harness (not part of the package): free ports, waiting for servers,
stopping process groups, and a real multi-node Ray cluster on loopback."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: Any) -> None:
    stop_process_groups([proc])


def stop_process_groups(procs: list[Any], grace: float = 30.0) -> None:
    """SIGTERM each process's group at once, then SIGKILL the groups whose leader has not
    exited within ``grace`` seconds (all of them together, not one after another)."""
    import signal
    import subprocess

    running = [p for p in procs if p.poll() is None]
    for p in running:
        os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + grace
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def ctrl_c_when(
    args: list[str], env: dict[str, str], ready: Any, what: str, timeout: float = 300.0, sig: str = "SIGINT"
) -> tuple[int, str]:
    """Start ``args`` in a process group of its own, wait until ``ready()`` (the program still
    running), send SIGINT to the group as a terminal's Ctrl-C does (or ``sig``: SIGTERM, as
    ``kill`` and Kubernetes send it), and return its exit code and output; the group is killed
    if anything fails on the way."""
    import signal
    import subprocess

    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                out = proc.communicate()[0] if proc.poll() is not None else ""
                raise AssertionError(f"{what}: not seen before the program ended or the deadline\n{out[-3000:]}")
            time.sleep(0.5)
        os.killpg(proc.pid, getattr(signal, sig))
        out, _ = proc.communicate(timeout=180)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(check: Any, what: str, timeout: float = 120.0, hint: str = "") -> None:
    """Poll ``check()`` every second until it is true (exceptions count as not yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}{hint}")


def mlflow_server(folder: Path, log: Path | None = None, timeout: float = 300) -> tuple[Any, str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite store in ``folder``), up and healthy:
    (its process, to stop with ``stop_process_group``; its URI). A multi-node run needs a
    tracking server every node reaches: pipeline refuses a node-local store there."""
    import subprocess
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--workers",
            "1",
        ],
        stdout=open(log, "w") if log else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        health = f"{uri}/health"  # http on 127.0.0.1
        wait_until(lambda: urllib.request.urlopen(health, timeout=2).status == 200, "the MLflow server", timeout)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, uri


class loopback_cluster:
    """A real multi-node Ray cluster on one machine (127.0.0.1, token auth on): a head and
    ``nodes - 1`` worker nodes, each ``ray start --block`` in its own process group, with
    ``cpus`` logical CPUs per node. For tests and benchmarks of multi-node behaviour.

        with loopback_cluster(nodes=2, cpus=2, logs=Path("logs")) as c:
            c.gcs          # "127.0.0.1:PORT", for RAY_ADDRESS
            c.dashboard    # "http://127.0.0.1:PORT", for job submission
    """

    def __init__(
        self, nodes: int = 2, cpus: int = 2, logs: Path | None = None, timeout: float = 120, env: dict | None = None
    ):
        """``env``: extra variables for every node (a real cluster's nodes have their own)."""
        self.nodes, self.cpus, self.timeout, self.extra_env = nodes, cpus, timeout, env or {}
        self.logs = Path(logs) if logs else None
        self.procs: list[Any] = []
        self.args: list[list[str]] = []

    def _start(self, args: list[str], name: str, at: int | None = None) -> None:
        import subprocess

        log = open(self.logs / f"{name}.log", "a") if self.logs else subprocess.DEVNULL
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        if at is None:
            self.procs.append(proc)
            self.args.append(args)
        else:
            self.procs[at] = proc

    def _restart_exited(self) -> None:
        """A worker node whose ``ray start`` gave up (it times out at startup when the GCS is
        slow to answer on a busy machine) is started again while the cluster comes up."""
        for i in range(1, len(self.procs)):
            if self.procs[i].poll() is not None:
                self._start(self.args[i], f"node{i}", at=i)

    def __enter__(self) -> loopback_cluster:
        import shutil
        import subprocess
        import tempfile
        import urllib.error
        import urllib.request

        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            **self.extra_env,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
        self._short = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        if self.logs:
            self.logs.mkdir(parents=True, exist_ok=True)
        ray_bin = shutil.which("ray", path=self.env["PATH"]) or "ray"
        gcs, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self.common = common = [
            f"--num-cpus={self.cpus}",
            "--block",
            "--disable-usage-stats",
            "--include-log-monitor=false",
            "--node-ip-address=127.0.0.1",
        ]
        try:
            self._start(
                [
                    ray_bin,
                    "start",
                    "--head",
                    f"--port={gcs}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    f"--ray-client-server-port={free_port()}",  # 10001 may be another cluster's on a shared machine
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--temp-dir={self._short}/head",
                    *common,
                ],
                "head",
            )
            self._wait(lambda: self._answers(f"{self.dashboard}/api/version", urllib), "the head node's dashboard")
            self.ray_bin = ray_bin
            for _ in range(1, self.nodes):
                self.add_node(wait=False)
            count = [
                sys.executable,
                "-c",
                f"import ray; ray.init(address='{self.gcs}', logging_level='ERROR');"
                "print(sum(n['Alive'] for n in ray.nodes()))",
            ]
            self._wait(
                lambda: (
                    self._restart_exited() is None
                    and subprocess.run(count, capture_output=True, text=True, timeout=60, env=self.env).stdout.strip()
                    == str(self.nodes)
                ),
                f"{self.nodes} alive nodes",
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_node(self, wait: bool = True) -> int:
        """Start one more worker node (``nodeN``, its index in ``procs``); with ``wait``, until
        the cluster counts it alive."""
        i = len(self.procs)
        self._start(
            [
                self.ray_bin,
                "start",
                f"--address={self.gcs}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self._short}/node{i}",
                *self.common,
            ],
            f"node{i}",
        )
        if wait:
            import ray

            self._wait(lambda: any(n["Alive"] and self.index(n) == i for n in ray.nodes()), f"node{i} alive")
        return i

    def index(self, node: dict) -> int:
        """Which of ``procs`` a ``ray.nodes()`` entry is (0 = the head), by its temp folder."""
        where = node.get("ObjectStoreSocketName", "")
        for i in range(len(self.procs)):
            if f"{self._short}/{'head' if i == 0 else f'node{i}'}/" in where:
                return i
        return -1

    @staticmethod
    def _answers(url: str, urllib: Any) -> bool:
        try:  # any HTTP answer counts (with token auth on, an anonymous call gets 401)
            urllib.request.urlopen(url, timeout=2)
        except urllib.error.HTTPError:
            pass
        return True

    def _wait(self, check: Any, what: str) -> None:
        wait_until(check, f"loopback cluster: {what}", self.timeout, f" (logs in {self.logs})" if self.logs else "")

    def __exit__(self, *exc: object) -> None:
        import shutil

        # A head's `ray start --block` stays up for 30 s and more after SIGTERM (its GCS and
        # autoscaler do not exit): the cluster is thrown away, so it gets a few seconds.
        stop_process_groups(list(reversed(self.procs)), grace=5)
        self.procs = []
        shutil.rmtree(self._short, ignore_errors=True)
