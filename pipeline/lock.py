"""Locks on shared storage, with a heartbeat: one process at a time per run, sweep or
preprocessing output.

A lock is a small JSON file (owner id, host, pid, what it is doing, a heartbeat time that a
daemon thread refreshes every few seconds). Another process that finds it either refuses
(``pipeline train`` with a ``train.run_name`` already running) or waits for it (a second
``pipeline preprocess`` of the same output). A lock whose holder is gone is taken over: its
heartbeat is older than ``stale_after`` seconds, or its pid is dead on this host.

On a local or NFS path the lock is created with ``O_CREAT | O_EXCL`` and a stale one is
moved aside with an atomic rename, so exactly one taker wins. Object stores (``s3://``, ...)
have no create-if-absent in fsspec: there the file is written and read back, which guards
against reruns and colleagues minutes apart but not against two starts in the same second.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import fsspec

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


class LockError(RuntimeError):
    """The resource is held by another live process; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(info: dict[str, Any]) -> str:
    age = time.time() - float(info.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    return (
        f"pid {info.get('pid')} on host {info.get('host')}, started {started}, last heartbeat {age:.0f} s ago"
        f"{': ' + info['what'] if info.get('what') else ''}"
    )


class StorageLock:
    """``with StorageLock(path, what=...):`` holds ``path`` (a local path or URI) while the
    block runs. ``acquire(wait=False)`` raises :class:`LockError` naming the holder;
    ``acquire(wait=True)`` polls until the holder releases it or goes stale."""

    def __init__(
        self, path: str, what: str = "", heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ):
        self.path, self.what = path, what
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.fs, self.p = fsspec.core.url_to_fs(path)
        self.local = "://" not in path or path.startswith("file://")
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- file access
    def _info(self, started: float | None = None) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "what": self.what,
            "started": started if started is not None else self._started,
            "heartbeat": time.time(),
        }

    def read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.p, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written this instant, or damaged: treated as held, and stale once old

    def _create(self) -> bool:
        body = json.dumps(self._info()).encode()
        self.fs.makedirs(self.p.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            try:
                fd = os.open(self.p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        if self.fs.exists(self.p):
            return False
        with self.fs.open(self.p, "wb") as f:
            f.write(body)
        time.sleep(0.5)
        return (self.read() or {}).get("owner") == self.owner

    def _stale(self, info: dict[str, Any]) -> bool:
        if not info:  # unreadable: judge by the file's age
            try:
                mtime = self.fs.info(self.p).get("mtime") or 0
                return (
                    time.time() - float(mtime if not hasattr(mtime, "timestamp") else mtime.timestamp())
                    > self.stale_after_s
                )
            except (OSError, TypeError, ValueError):
                return False
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return True
        return time.time() - float(info.get("heartbeat", 0)) > self.stale_after_s

    def _take_over(self) -> None:
        """Move a stale lock aside; the rename is atomic, so of two takers only one moves it."""
        aside = f"{self.p}.stale-{self.owner}"
        try:
            if self.local:
                os.rename(self.p, aside)
            else:
                self.fs.mv(self.p, aside)
            self.fs.rm(aside)
        except (FileNotFoundError, OSError):
            pass

    # ---------------------------------------------------------------- API
    def acquire(self, wait: bool = False, poll_s: float = 1.0, on_wait: Any = None) -> StorageLock:
        self._started = time.time()
        told = False
        while True:
            if self._create():
                break
            info = self.read()
            if info is None:
                continue  # released between our attempt and the read
            if self._stale(info):
                print(
                    f"[lock] taking over a stale lock {self.path} ({describe(info) if info else 'unreadable'})",
                    file=sys.stderr,
                    flush=True,
                )
                self._take_over()
                continue
            if not wait:
                raise LockError(describe(info))
            if not told and on_wait is not None:
                on_wait(info)
                told = True
            time.sleep(poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="pipeline-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.read() or {}).get("owner") != self.owner:
                    return  # taken over (we looked dead): stop touching it
                tmp = f"{self.p}.{self.owner}.tmp"
                with self.fs.open(tmp, "w") as f:
                    json.dump(self._info(), f)
                self.fs.mv(tmp, self.p)
            except OSError:
                pass  # storage hiccup: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
        try:
            if (self.read() or {}).get("owner") == self.owner:
                self.fs.rm(self.p)
        except OSError:
            pass

    def __enter__(self) -> StorageLock:
        if self._thread is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_named(folder: str, key: str, name: str, command: str) -> StorageLock:
    """The lock of a named run or sweep (``key`` = ``train.run_name`` or ``tune.name``): a
    second one refuses, naming the first and what to do."""
    lock = StorageLock(f"{folder}/.pipeline-lock.json", what=f"{command} {key}={name}")
    try:
        return lock.acquire()
    except LockError as e:
        raise LockError(
            f"{key} '{name}' is already running ({e}); wait for it to end, or choose another {key}"
        ) from None
