"""The command line as a user meets it: help, config printing, clear errors, download."""

import gzip
import http.server
import subprocess
import sys
import threading

import pytest
import yaml

from pipeline.data.download import MULTI30K_FILES, download_multi30k

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def run(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120, **kw
    )


def test_help_lists_commands():
    out = run("--help").stdout
    for cmd in ("demo", "train", "preprocess", "config", "translate", "evaluate", "download"):
        assert cmd in out
    assert "hidden_size" in run("train", "--help").stdout


def test_config_prints_resolved_yaml():
    p = run("config", "data=multi30k", "model.hidden_size=512")
    assert p.returncode == 0
    cfg = yaml.safe_load(p.stdout)
    assert cfg["model"]["hidden_size"] == 512 and cfg["data"]["test_split"] == "test_2016_flickr"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (("train", "model.hidden=3"), "error: unknown config key 'model.hidden'; valid keys: model.embedding_size"),
        (("train", "train.num_workers=two"), "error: train.num_workers must be of type int, got 'two'"),
        (
            ("preprocess", "data=multi30k", "data.root=/does/not/exist"),
            "error: data.root '/does/not/exist' does not exist",
        ),
        (("translate", "--model", "/does/not/exist"), "is not a model bundle: missing model.pt"),
        # Refused before Ray starts or any data is read: nothing to see after an hour of training.
        (
            ("train", "tracking.tracking_uri=http://127.0.0.1:9"),
            "error: MLflow tracking server http://127.0.0.1:9 is unreachable",
        ),
    ],
)
def test_errors_are_one_clear_line(args, message):
    p = run(*args, input="")
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr and "Traceback" not in p.stderr


def test_a_missing_data_root_is_said_before_ray_is_joined(tmp_path):
    """A mistyped data.root: the error comes first, not after Ray's start-up (16 s on 2 cores
    before). RAY_ADDRESS names a cluster that is not there: a command that joined Ray first
    would fail on that instead (or wait for it)."""
    import os

    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    missing = tmp_path / "missing"
    common = ["data=multi30k", f"data.root={missing}", f"data.output_dir={tmp_path}/out"]
    for cmd in (
        ["preprocess"],
        ["train", f"train.storage_path={tmp_path}/ray", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"],
        ["evaluate", "--model", str(tmp_path)],
    ):
        p = run(*cmd, *common, env=env)
        assert p.returncode == 2, (cmd, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1] == f"error: data.root '{missing}' does not exist", (cmd, p.stderr)
    assert not (tmp_path / "out").exists()


def test_only_our_own_errors_become_one_line(tmp_path):
    import fsspec

    from pipeline import cli
    from pipeline.tracking import replay

    with pytest.raises(FileNotFoundError, match="no spill file") as ours:  # raised in pipeline/ with its context
        replay(str(tmp_path / "nothing-here"), None)
    assert cli._user_error(ours.value) is ours.value
    with pytest.raises(FileNotFoundError) as system:  # the OS's own, raised through a library
        (tmp_path / "missing" / "x").read_text()
    assert system.value.errno is not None and cli._user_error(system.value) is None
    with pytest.raises(FileNotFoundError) as library:  # no errno, but not ours: fsspec's own message
        fsspec.filesystem("memory").info("/missing")
    assert library.value.errno is None and cli._user_error(library.value) is None
    wrapped = RuntimeError("a Ray task failed")
    wrapped.__cause__ = ours.value  # Ray wraps worker errors: ours is still found inside
    assert cli._user_error(wrapped) is ours.value


@pytest.mark.slow
def test_a_library_error_in_a_deleted_folder_keeps_its_origin(tmp_path):
    # What a job saw when Ray deleted its working folder under it: a relative path, a cwd
    # that is gone, and an OSError from deep inside a library that names nothing.
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"cd {gone} && rmdir {gone} && exec {sys.executable} -m pipeline.cli download multi30k rel/m30k"
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" in p.stderr and "FileNotFoundError" in p.stderr
    assert "pipeline/data/download.py" in p.stderr and "pathlib" in p.stderr  # where it came from
    assert "\nerror: " not in "\n" + p.stderr


@pytest.mark.slow
def test_download_from_a_server_and_offline_error(tmp_path):
    src = tmp_path / "srv"
    src.mkdir()
    for name in MULTI30K_FILES:
        (src / name).write_bytes(gzip.compress(f"{name}\n".encode()))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(src), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = download_multi30k(str(tmp_path / "m30k"), base=f"http://127.0.0.1:{server.server_port}")
        assert sorted(p.name for p in dest.iterdir()) == sorted(MULTI30K_FILES)
        assert gzip.decompress((dest / "val.de.gz").read_bytes()) == b"val.de.gz\n"
    finally:
        server.shutdown()
    with pytest.raises(ConnectionError, match="are you offline"):
        download_multi30k(str(tmp_path / "x"), base=f"http://127.0.0.1:{server.server_port}", timeout=2)


@pytest.mark.slow
def test_doctor_reports_each_check(tmp_path):
    ok = run(
        "doctor",
        "data=multi30k",
        f"data.root={REPO / '..' / 'shared' / 'data' / 'multi30k'}",
        f"train.storage_path={tmp_path}/ray",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
        "train.num_workers=1",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    lines = {line.split()[1]: line for line in ok.stdout.splitlines() if line.startswith(("ok", "FAIL"))}
    assert set(lines) == {"data", "storage", "mlflow", "ray"} and all(v.startswith("ok") for v in lines.values())
    assert "3 input file(s)" in lines["data"] and "CPUs" in lines["ray"]
    (tmp_path / "afile").write_text("x")
    bad = run(
        "doctor",
        "data=multi30k",
        f"data.root={tmp_path}/missing",
        f"train.storage_path={tmp_path}/afile/ray",
        "tracking.tracking_uri=http://127.0.0.1:9",
        "train.use_gpu=true",
        "train.num_workers=1",
    )
    assert bad.returncode == 1
    fails = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 4, bad.stdout
    text = "\n".join(fails)
    assert f"data.root '{tmp_path}/missing' does not exist" in text
    assert "train.storage_path" in text and "cannot be written" in text
    assert "127.0.0.1:9" in text and "needs 1 GPUs; the cluster has 0" in text


def test_config_names_the_options_and_the_recipe():
    p = run("config", "data=demo_video", "model=small")
    assert p.returncode == 0, p.stderr[-2000:]
    first = p.stdout.splitlines()[0]
    assert first == (
        "# options: data=demo_video model=small train=default tracking=default tune=default "
        "recipe=video (named by data=demo_video; not over model=small)"
    )
    cfg = yaml.safe_load(p.stdout)
    assert cfg["model"]["hidden_size"] == 128 and cfg["train"]["batch_tokens"] == 0
