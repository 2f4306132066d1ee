"""Storage locks between real processes: a held lock refuses (naming its holder) or makes
the second process wait; a lock whose process was SIGKILLed, or whose heartbeat stopped,
is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.lock import LockError, StorageLock

HOLD = """
import sys, time
from pipeline.lock import StorageLock
lock = StorageLock(sys.argv[1], what="holder", heartbeat_s=0.2).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _holder(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    path = tmp_path / "run" / ".lock"
    proc = _holder(path, 30)
    try:
        with pytest.raises(LockError, match=rf"pid {proc.pid} on host .*holder"):
            StorageLock(str(path)).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_waiter_gets_the_lock_when_the_holder_releases(tmp_path):
    path = tmp_path / ".lock"
    proc = _holder(path, 2)
    waited = []
    t0 = time.time()
    lock = StorageLock(str(path)).acquire(wait=True, poll_s=0.1, on_wait=waited.append)
    try:
        assert proc.wait(5) == 0
        assert waited and waited[0]["pid"] == proc.pid
        assert time.time() - t0 >= 1.0  # it did wait for the holder
        assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not path.exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / ".lock"
    proc = _holder(path, 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with StorageLock(str(path), what="taker"):
        assert json.loads(path.read_text())["what"] == "taker"


def test_lock_with_a_stopped_heartbeat_is_taken_over(tmp_path):
    """A holder on another host cannot be checked by pid: only its heartbeat tells."""
    path = tmp_path / ".lock"
    path.write_text(
        json.dumps(
            {"owner": "x", "host": "elsewhere", "pid": 1, "started": time.time() - 100, "heartbeat": time.time() - 100}
        )
    )
    with pytest.raises(LockError, match="host elsewhere"):
        StorageLock(str(path), stale_after_s=1000).acquire()
    with StorageLock(str(path), stale_after_s=60):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_heartbeat_keeps_a_live_lock_fresh(tmp_path):
    path = tmp_path / ".lock"
    with StorageLock(str(path), heartbeat_s=0.1):
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads(path.read_text())["heartbeat"] > first
        with pytest.raises(LockError):
            StorageLock(str(path), stale_after_s=0.3).acquire()  # fresh heartbeat: not stale
