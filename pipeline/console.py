"""What a run prints: our own lines, a progress bar per epoch and the summary on the console;
Ray's and Ray Data's output (worker logs, execution plans, ``TrainingReport`` dumps, raylet
warnings, Tune's tables, Ray's and MLflow's Python logging and warnings) in a log file under
the run folder, whose path is printed first. ``--verbose`` shows all of it live as well.

Worker output reaches the driver the way Ray forwards it (``log_to_driver``, from every node
of a cluster through the GCS), so nothing here depends on where the workers run. Our lines are
told apart by their tag (``[train] ...``); rank 0 sends its progress as ``[progress] {json}``
lines, which the driver draws as a tqdm bar in a terminal and as plain lines otherwise (CI,
``pipeline submit``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .redaction import redact

# Lines of ours that workers and trial drivers print, shown on the console.
TAGS = ("[preprocess]", "[train]", "[test]", "[tune]", "[tracking]", "[metrics]", "[console]")
PROGRESS = "[progress] "
PLAIN_EVERY_S = 60.0  # a progress line at most this often when there is no terminal to redraw
MLFLOW_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
HANDLER = "pipeline_console"  # our entry in Ray's stdstream dispatcher
LOGGERS = ("ray", "mlflow", "py.warnings")  # and their children: their console output is hidden

_verbose = False
_active: _Capture | None = None
_lock = threading.Lock()


def set_verbose(on: bool) -> None:
    """``--verbose``: Ray's output is shown live too (it still goes to the log file)."""
    global _verbose
    _verbose = on


def log_file(folder: str) -> str:
    """The console log of the run whose folder is ``folder``: ``folder/logs/console.log``. A
    folder on an object store cannot be appended to line by line; its log stays on this
    machine, under the temporary folder, with the same tail."""
    if "://" in folder and not folder.startswith("file://"):
        tail = folder.split("://", 1)[1].split("@")[-1].strip("/")  # no userinfo in a local path
        return os.path.join(tempfile.gettempdir(), "pipeline-logs", tail, "logs", "console.log")
    return str(Path(folder.removeprefix("file://")).expanduser().resolve() / "logs" / "console.log")


class _Capture:
    """An open log file, the console streams as they were, and the progress bar."""

    def __init__(self, path: str, verbose: bool, sweep: bool = False):
        self.path, self.verbose, self.sweep = path, verbose, sweep
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(path, "a", encoding="utf-8", buffering=1)  # closed when the capture ends
        self.mine: list[logging.Handler] = []
        self.workers = logging.getLogger("pipeline.console.workers")
        self.workers.propagate = False
        self.workers.setLevel(logging.INFO)  # not the root's WARNING: every line is kept
        self.out, self.err = sys.stdout, sys.stderr
        self.terminal = not verbose and not sweep and _isatty(self.out)
        self.bar: Any = None
        self.bar_epoch = 0
        self.last_plain = 0.0
        self.saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    def handler(self) -> logging.Handler:
        """A handler into the file, one per logger: ray.init re-formats the "ray" logger's."""
        h = logging.StreamHandler(self.stream)
        h.setLevel(logging.INFO)  # what the console showed; ray.data's logger passes DEBUG on
        h.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s"))
        self.mine.append(h)
        return h

    def show(self, line: str, is_err: bool = False) -> None:
        self.close_bar()
        print(line, file=self.err if is_err else self.out, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def progress(self, p: dict[str, Any]) -> None:
        epoch, steps, total = p["epoch"], p["steps"], p.get("total")
        figures = f"loss {p['loss']:.3f}, {p['tokens_per_s']:,.0f} tokens/s"
        if self.sweep:  # trials run side by side: no bar, each trial's epochs named
            if p.get("done"):
                self.show(f"[train] {p.get('run', '')} epoch {epoch} done step {steps}: {figures}")
            return
        if self.terminal:
            if self.bar is None or self.bar_epoch != epoch:
                from tqdm import tqdm

                self.close_bar()
                self.bar = tqdm(total=total, initial=steps, desc=f"epoch {epoch}", unit="step", file=self.out)
                self.bar_epoch = epoch
            self.bar.n = steps
            self.bar.set_postfix_str(figures, refresh=True)
            if p.get("done"):
                self.close_bar()
            return
        now = time.time()
        if p.get("done") or now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            of = f"/{total}" if total and not p.get("done") else ""
            state = "done" if p.get("done") else "at"
            print(f"[train] epoch {epoch} {state} step {steps}{of}: {figures}", file=self.out, flush=True)


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_line(
    run: str, epoch: int, steps: int, total: int | None, loss: float, tokens_per_s: float, done: bool
) -> str:
    """What rank 0 prints for the driver's progress bar: ``steps`` of this epoch so far,
    ``total`` the steps the previous epoch took (None in the first)."""
    p = {
        "run": run,
        "epoch": epoch,
        "steps": steps,
        "total": total,
        "loss": loss,
        "tokens_per_s": tokens_per_s,
        "done": done,
    }
    return PROGRESS + json.dumps(p)


def _worker_prefix(data: dict[str, Any]) -> str:
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    return f"({name + ' ' if name else ''}pid={data.get('pid')}{', ip=' + ip if ip != data.get('localhost') else ''})"


def _router(ray_print: Any):
    """Ray's stdstream handler, wrapped: our lines and progress are ours to print; the rest goes
    to the log file, and to Ray's own printer when there is no capture or with --verbose."""

    def route(data: dict[str, Any]) -> None:
        with _lock:
            c = _active
            lines = data.get("lines", [])
            if c is not None:
                prefix = _worker_prefix(data)
                for line in lines:
                    c.workers.log(logging.ERROR if data.get("is_err") else logging.INFO, "%s %s", prefix, line)
            rest = []
            for line in lines:
                if line.startswith(PROGRESS):
                    try:
                        (c or _Plain).progress(json.loads(line[len(PROGRESS) :]))
                    except (ValueError, KeyError, TypeError):
                        rest.append(line)
                elif c is not None and line.startswith(TAGS):
                    # A sweep's trials print side by side: Ray's prefix tells them apart.
                    c.show(f"{_worker_prefix(data)} {line}" if c.sweep else line, bool(data.get("is_err")))
                else:
                    rest.append(line)
            if rest and (c is None or c.verbose):
                ray_print({**data, "lines": rest})

    return route


class _Plain:
    """Progress with no capture open (a run started in-process, as the tests do): plain lines."""

    @staticmethod
    def progress(p: dict[str, Any]) -> None:
        if p.get("done"):
            print(f"[train] epoch {p['epoch']} done step {p['steps']}: loss {p['loss']:.3f}", flush=True)


def attach_ray() -> None:
    """Put the router in front of Ray's printer of worker output; called once Ray is up (ray.init
    adds its printer). Idempotent; after a new ray.init it wraps the new printer. The errors the
    GCS publishes (raylet warnings such as "N PYTHON worker processes have been started", dead
    workers) are printed by Ray's error thread straight through ``print_to_stdstream``: that
    goes through the router too."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not hasattr(ray_worker.print_to_stdstream, "ray_print"):
        to_stdstream = ray_worker.print_to_stdstream

        def errors(data: dict[str, Any], ignore_prefix: bool) -> None:
            _router(functools.partial(to_stdstream, ignore_prefix=ignore_prefix))(data)

        errors.ray_print = to_stdstream  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = errors
    with dispatcher._lock:
        handlers = dict(dispatcher.handlers)
    ray_print = handlers.get("ray_print_logs")
    if ray_print is None:  # log_to_driver=False: nothing is forwarded to route
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, _router(ray_print))


def _console_handlers(logger: logging.Logger, ours: list[logging.Handler]) -> list[logging.Handler]:
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and h not in ours
    ]


class _LineWriter:
    """A stdout for code that prints Ray's tables (Tune): whole lines into the log file, and on
    to the console with --verbose."""

    def __init__(self, c: _Capture):
        self.c, self.buf = c, ""
        self.logger = logging.getLogger("pipeline.console.stdout")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.logger.info("%s", line)
        if self.c.verbose:
            self.c.out.write(text)
        return len(text)

    def flush(self) -> None:
        if self.c.verbose:
            self.c.out.flush()

    def isatty(self) -> bool:
        return False


def _stderr_to(c: _Capture) -> int | None:
    """File descriptor 2 into the log file: Ray's C++ core worker in this process writes its
    errors there (``core_worker.cc: ...``), past Python. Python's ``sys.stderr`` stays on the
    console through a copy of the old descriptor. Returns that copy, to put back."""
    try:
        sys.stderr.flush()
        fd2 = os.dup(2)
        os.dup2(c.stream.fileno(), 2)
    except (OSError, ValueError):
        return None
    sys.stderr = c.err = os.fdopen(os.dup(fd2), "w", buffering=1, encoding="utf-8", errors="replace")
    return fd2


@contextlib.contextmanager
def capture(path: str, sweep: bool = False) -> Iterator[str]:
    """Hide Ray's output in ``path`` (appended to) while the block runs, and say so first.
    ``sweep``: runs side by side, so our lines keep Ray's prefix and progress is one line per
    epoch and trial."""
    global _active
    import mlflow  # noqa: F401  (imported now: importing it sets up its loggers' console handlers)
    import ray.data  # same: ray.data sets up its console handler on import

    c = _Capture(path, _verbose, sweep)
    c.stream.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {redact(' '.join(sys.argv))}\n")
    c.workers.addHandler(c.handler())
    stdout_logger = logging.getLogger("pipeline.console.stdout")
    stdout_logger.addHandler(c.handler())
    known = [n for n, v in logging.root.manager.loggerDict.items() if isinstance(v, logging.Logger)]
    for name in sorted({n for n in known if n.split(".")[0] in LOGGERS} | set(LOGGERS)):
        logger = logging.getLogger(name)
        if not logger.handlers and name not in LOGGERS:
            continue  # propagates to one of the loggers handled here
        c.saved.append((logger, list(logger.handlers), logger.propagate))
        if not c.verbose:
            for h in _console_handlers(logger, _active.mine if _active else []):
                logger.removeHandler(h)
        logger.addHandler(c.handler())
        logger.propagate = False
    saved_env = os.environ.get(MLFLOW_BARS)
    if not c.verbose:
        logging.captureWarnings(True)  # warnings go to the py.warnings logger, so to the file
        os.environ[MLFLOW_BARS] = "false"  # its download bars print straight to stderr
    stderr, fd2 = sys.stderr, _stderr_to(c) if not c.verbose else None
    previous = _active
    _active = c
    try:
        if ray.is_initialized():
            attach_ray()
        c.show(f"[console] Ray's output is in {redact(path)}" + ("" if c.verbose else " (--verbose shows it here)"))
        yield path
    finally:
        with _lock:
            _active = previous
            c.close_bar()
        logging.captureWarnings(False)
        if fd2 is not None:
            sys.stderr.flush()
            os.dup2(fd2, 2)
            os.close(fd2)
            sys.stderr.close()
            sys.stderr = stderr
        if saved_env is None:
            os.environ.pop(MLFLOW_BARS, None)
        else:
            os.environ[MLFLOW_BARS] = saved_env
        for logger, handlers, propagate in reversed(c.saved):
            logger.handlers = handlers
            logger.propagate = propagate
        for h in c.mine:
            c.workers.removeHandler(h)
            stdout_logger.removeHandler(h)
        c.stream.close()


@contextlib.contextmanager
def hidden() -> Iterator[None]:
    """Code in this block that prints straight to stdout (Tune's status tables) prints into the
    log file instead; a no-op with no capture open."""
    c = _active
    if c is None:
        yield
        return
    with contextlib.redirect_stdout(_LineWriter(c)):
        yield
