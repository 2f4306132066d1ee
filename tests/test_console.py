"""The quiet console: Ray's and MLflow's logging, warnings, Tune's prints and the workers' own
Ray lines go to the run's log file; our tagged lines and the progress reach the console. The
router is fed batches shaped as Ray's log monitor sends them; the end-to-end runs on real Ray
are in test_lifecycle.py (a `pipeline train`) and below (`pipeline preprocess`)."""

import fcntl
import json
import logging
import os
import select
import struct
import subprocess
import sys
import termios
import warnings

import pytest

from pipeline import console


def _batch(*lines: str, is_err: bool = False) -> dict:
    return {
        "lines": list(lines),
        "pid": 4242,
        "ip": "10.0.0.7",
        "localhost": "127.0.0.1",
        "is_err": is_err,
        "actor_name": "RayTrainWorker",
        "task_name": "",
        "job": "01000000",
    }


HIDDEN = (
    "Execution plan",
    "worker group of size",
    "Creating initial MLflow",
    "RayDeprecation",
    "Tune status",
    "core_worker.cc",
)


def test_log_file_is_under_the_run_folder(tmp_path):
    assert console.log_file(str(tmp_path / "run")) == str(tmp_path / "run" / "logs" / "console.log")
    assert console.log_file(f"file://{tmp_path}/run") == str(tmp_path / "run" / "logs" / "console.log")
    remote = console.log_file("s3://KEY:pw@bucket/ray/run")
    assert remote.endswith(os.path.join("bucket", "ray", "run", "logs", "console.log")) and "pw" not in remote
    assert remote.startswith(os.path.realpath(os.sep)) or os.path.isabs(remote)


def test_capture_hides_ray_mlflow_and_warnings_in_the_file(tmp_path, capfd):
    path = str(tmp_path / "run" / "logs" / "console.log")
    console.set_verbose(False)
    import ray.data  # noqa: F401  (its console handlers exist from its import on)

    ray_console = [h for h in logging.getLogger("ray").handlers if not isinstance(h, logging.FileHandler)]
    assert ray_console
    with console.capture(path) as shown:
        logging.getLogger("ray.data").info("Execution plan of Dataset d0: Input -> Map")
        logging.getLogger("ray.train").warning("worker group of size 2 started")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        warnings.warn("a RayDeprecationWarning of some kind", DeprecationWarning, stacklevel=1)
        with console.hidden():
            print("+---------------- Tune status table")
        print("[train] a line of ours, printed by the driver")
        os.write(2, b"[2026-12-02 05:15:24,668 E 19894 19894] core_worker.cc:2465: Actor with class name\n")  # C++
        print("error: ours, on stderr", file=sys.stderr)
    os.write(2, b"fd 2 is the console again\n")
    out = capfd.readouterr()
    assert "error: ours, on stderr" in out.err and "fd 2 is the console again" in out.err
    assert shown == path
    assert f"[console] Ray's output is in {path} (--verbose shows it here)" in out.out
    assert "[train] a line of ours" in out.out
    text = open(path).read()
    for hidden in HIDDEN:
        assert hidden not in out.out + out.err and hidden in text, hidden
    # Ray's console handler is back once the run is over.
    assert [h for h in logging.getLogger("ray").handlers if not isinstance(h, logging.FileHandler)] == ray_console


def test_router_shows_our_lines_and_progress_and_logs_the_rest(tmp_path, capfd):
    printed: list[dict] = []  # what reached Ray's own printer
    route = console._router(printed.append)
    path = str(tmp_path / "logs" / "console.log")
    progress = console.progress_line("r", 2, 83, 83, 3.2104, 5432.1, done=True)
    batch = _batch(
        "Reporting training result 1: TrainingReport(checkpoint=None, metrics={}) from rank 1",
        "[train] step 166 epoch 2: val_loss 3.286 val_bleu 0.389 (best)",
        progress,
    )
    console.set_verbose(False)
    with console.capture(path):
        route(batch)
        route(_batch("WARNING: 14 PYTHON worker processes have been started", is_err=True))
    out = capfd.readouterr()
    assert printed == []
    lines = out.out.splitlines()
    assert "[train] step 166 epoch 2: val_loss 3.286 val_bleu 0.389 (best)" in lines
    assert "[train] epoch 2 done step 83: loss 3.210, 5,432 tokens/s" in lines
    assert "TrainingReport" not in out.out + out.err and "PYTHON worker" not in out.out + out.err
    text = open(path).read()
    assert "(RayTrainWorker pid=4242, ip=10.0.0.7) Reporting training result 1: TrainingReport(" in text
    assert "ERROR pipeline.console.workers -- (RayTrainWorker pid=4242, ip=10.0.0.7) WARNING: 14 PYTHON" in text

    console.set_verbose(True)
    try:
        with console.capture(path):
            route(batch)
    finally:
        console.set_verbose(False)
    out = capfd.readouterr()
    assert [b["lines"] for b in printed] == [[batch["lines"][0]]]  # Ray prints the rest as it would
    assert "[train] step 166" in out.out and "[console] Ray's output is in" in out.out

    with console.capture(path, sweep=True):  # trials side by side: Ray's prefix names the source
        route(batch)
    lines = capfd.readouterr().out.splitlines()
    assert (
        "(RayTrainWorker pid=4242, ip=10.0.0.7) [train] step 166 epoch 2: val_loss 3.286 val_bleu 0.389 (best)" in lines
    )
    assert "[train] r epoch 2 done step 83: loss 3.210, 5,432 tokens/s" in lines

    route(batch)  # no capture open (a run started in-process): Ray prints all but the progress
    assert printed[-1]["lines"] == batch["lines"][:2]
    assert "[train] epoch 2 done step 83" in capfd.readouterr().out


def test_raylet_warnings_from_rays_error_thread_are_routed(tmp_path, capfd):
    import ray._private.worker as ray_worker

    console.attach_ray()
    warning = "WARNING: 24 PYTHON worker processes have been started on node: ce67 with address: 127.0.0.1"
    path = str(tmp_path / "logs" / "console.log")
    with console.capture(path):
        # as Ray's listen_error_messages thread calls it
        ray_worker.print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capfd.readouterr()
    assert "PYTHON worker processes" not in out.out + out.err
    assert f"(pid=raylet) {warning}" in open(path).read()
    ray_worker.print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert warning in capfd.readouterr().out  # no capture open: Ray prints it as ever


def test_progress_bar_in_a_terminal_and_lines_without_one(tmp_path, capfd):
    c = console._Capture(str(tmp_path / "c.log"), verbose=False)
    assert not c.terminal  # pytest's capture is no terminal: plain lines
    c.progress(json.loads(console.progress_line("r", 1, 20, None, 4.5, 1000.0, False)[len(console.PROGRESS) :]))
    c.progress(json.loads(console.progress_line("r", 1, 40, None, 4.0, 1100.0, False)[len(console.PROGRESS) :]))
    c.progress(json.loads(console.progress_line("r", 1, 83, None, 3.9, 1200.0, True)[len(console.PROGRESS) :]))
    lines = capfd.readouterr().out.splitlines()
    # the first line, then none until PLAIN_EVERY_S has passed, then the epoch's end
    assert lines == [
        "[train] epoch 1 at step 20: loss 4.500, 1,000 tokens/s",
        "[train] epoch 1 done step 83: loss 3.900, 1,200 tokens/s",
    ]
    c.stream.close()


def test_progress_bar_draws_in_a_real_terminal(tmp_path, monkeypatch):
    main, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns, as a terminal has
    tty = os.fdopen(secondary, "w")
    monkeypatch.setattr(sys, "stdout", tty)
    c = console._Capture(str(tmp_path / "c.log"), verbose=False)
    assert c.terminal
    for steps, done in ((40, False), (83, True)):
        c.progress(json.loads(console.progress_line("r", 2, steps, 83, 3.9, 1200.0, done)[len(console.PROGRESS) :]))
    tty.flush()
    drawn = ""
    while select.select([main], [], [], 0.5)[0]:
        drawn += os.read(main, 65536).decode()
    tty.close()
    os.close(main)
    c.stream.close()
    assert "epoch 2" in drawn and "40/83" in drawn and "83/83" in drawn and "loss 3.900, 1,200 tokens/s" in drawn
    assert "\r" in drawn  # redrawn in place, not a line per update


@pytest.mark.slow
def test_preprocess_is_quiet_and_verbose_shows_ray(ray_session, tmp_path):
    """`pipeline preprocess` (real processes on the session's Ray): the default output has our
    lines and the path of the log file, which holds Ray Data's execution plan; --verbose shows
    the plan on the console."""
    args = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "preprocess",
        "data=demo_text",
        f"data.root={tmp_path}/demo",
        "data.demo_size=2000",
        "data.vocab_size=300",
        f"data.output_dir={tmp_path}/out",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stdout[-2000:] + quiet.stderr[-2000:]
    log = tmp_path / "out" / "logs" / "console.log"
    shown = quiet.stdout + quiet.stderr
    assert f"[console] Ray's output is in {log}" in shown and "[preprocess] built " in shown
    assert "Execution plan" not in shown and "INFO" not in shown, shown
    assert "Execution plan" in log.read_text()
    loud = subprocess.run([*args, "--force", "--verbose"], env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0, loud.stdout[-2000:] + loud.stderr[-2000:]
    assert "Execution plan" in loud.stdout + loud.stderr and "[preprocess] built " in loud.stdout
    print(
        f"\n[console] preprocess printed {len(shown.splitlines())} lines, --verbose {len((loud.stdout + loud.stderr).splitlines())}"
    )
