"""The command line as a user meets it: help, config printing, clear errors, download."""

import gzip
import http.server
import subprocess
import sys
import threading

import pytest
import yaml

from pipeline.data.download import MULTI30K_FILES, download_multi30k


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120, **kw)


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


@pytest.mark.parametrize("args,message", [
    (("train", "model.hidden=3"), "error: unknown config key 'model.hidden'; valid keys: model.embedding_size"),
    (("train", "train.num_workers=two"), "error: train.num_workers must be of type int, got 'two'"),
    (("preprocess", "data=multi30k", "data.root=/does/not/exist"), "error: data.root '/does/not/exist' does not exist"),
    (("translate", "--model", "/does/not/exist"), "is not a model bundle: missing model.pt"),
])
def test_errors_are_one_clear_line(args, message):
    p = run(*args, input="")
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr and "Traceback" not in p.stderr


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
