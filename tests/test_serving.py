"""The logged MLflow model with MLflow's own tools, and gated promotion, on a real SQLite
MLflow store without Ray: a small bundle (untrained weights, tokenizers trained on demo
sentences) logged by ``tracking.log_model``; ``mlflow.pyfunc.load_model`` in a process
without our package on its path; a real ``mlflow models serve`` process answering HTTP;
no pickle in the model; ``pipeline translate`` on ``models:/NAME@champion``; the
champion/challenger rule and ``pipeline promote``."""

import getpass
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from loopback import free_port
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.config import load_config
from pipeline.data.synthetic import generate_pairs
from pipeline.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Vocab, train_tokenizer
from pipeline.inference import Translator, bundle_meta, save_bundle
from pipeline.models import build_model

pytestmark = pytest.mark.slow
MLFLOW = str(Path(sys.executable).parent / "mlflow")
SENTENCES = ["the small dog sees the red house .", "a woman runs quickly .", "the man reads a book ."]


def _env(uri):
    """A child process's environment: the store, and not our checkout on the path (the
    model must bring its own code)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The venv's bin/ first, as an activated venv has it: `mlflow models serve` runs `uvicorn`.
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "MLFLOW_TRACKING_URI": uri, "PATH": path}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(["model=small", "data=demo_text"])
    pairs = generate_pairs(400, seed=1)
    src_tok = train_tokenizer([s for s, _ in pairs], "bpe", 300)
    tgt_tok = train_tokenizer([t for _, t in pairs], "bpe", 300)
    vocab = Vocab(src_tok.get_vocab_size(), tgt_tok.get_vocab_size(), False, PAD_ID, BOS_ID, EOS_ID)
    torch.manual_seed(0)
    model = build_model(
        model_cfg=cfg.model,
        src_vocab_size=vocab.src_vocab_size,
        tgt_vocab_size=vocab.tgt_vocab_size,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
    )
    bundle = str(tmp / "bundle-src")
    save_bundle(bundle, model, bundle_meta(cfg.model, vocab, cfg.data), src_tok.to_str(), tgt_tok.to_str())
    run_id, _ = tracking.open_run(uri, "serving", "serving-test", {}, {})
    model_uri = tracking.log_model(uri, run_id, bundle, False, SENTENCES[:2])
    return {
        "tmp": tmp,
        "uri": uri,
        "bundle": bundle,
        "model_uri": model_uri,
        "run_id": run_id,
        "translator": Translator.load(bundle),
    }


@pytest.fixture(scope="module")
def champion(logged):
    """The logged model registered as the first version of a model: it becomes champion."""
    name = "serve-demo"
    version = tracking.register_challenger(logged["uri"], logged["model_uri"], name, _tags(31.2, "data-a/test=100"))
    promoted, reason = tracking.promote_if_better(logged["uri"], name, version, "test_bleu", "max", "data-a/test=100")
    assert promoted and version == "1", reason
    return f"models:/{name}@champion"


def _tags(value, fingerprint):
    return {
        tracking.METRIC_TAG: "test_bleu",
        tracking.VALUE_TAG: str(value),
        tracking.DATA_TAG: fingerprint,
        tracking.SWEEP_TAG: "test-sweep",
        tracking.COMMIT_TAG: "abc123",
    }


def test_model_files_hold_no_pickle(logged):
    import mlflow.artifacts

    # MLflow resolves a models:/ URI through its global store whatever tracking_uri says.
    with tracking.fluent_store(logged["uri"]):
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=logged["model_uri"], dst_path=str(logged["tmp"] / "downloaded")
            )
        )
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "artifacts/bundle/model.pt" in names and "artifacts/bundle/model.json" in names, names
    assert "serving.py" in names and "code/pipeline/inference.py" in names, names
    assert not [n for n in names if n.endswith(".pkl") or "__pycache__" in n], names
    assert tracking.pickles_in(local) == [], names
    assert (local / "artifacts/bundle/model.pt").read_bytes()[:2] == b"PK"  # torch's zip format
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel and "pytorch" not in mlmodel
    assert "beam_size" in mlmodel and "batch_size" in mlmodel and "length_penalty" in mlmodel  # params
    reqs = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and any(r.startswith("tokenizers==") for r in reqs)
    # The walk finds a pickle when there is one: it can fail.
    planted = logged["tmp"] / "planted"
    planted.mkdir()
    (planted / "state.bin").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    (planted / "weights.pth").write_bytes(b"not even a pickle")
    assert tracking.pickles_in(planted) == ["state.bin", "weights.pth"]


def test_logging_and_registering_leave_mlflow_pointing_where_it_was(logged, monkeypatch):
    """MLflow 3's set_tracking_uri/set_registry_uri also write MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI into os.environ. Logging or registering a model must not leave
    them (or MLflow's globals) at this store: the next run or client in a notebook, and
    every program started after, would go there."""
    import mlflow

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(k, raising=False)
    default = mlflow.get_tracking_uri()
    assert default != logged["uri"]
    run_id, _ = tracking.open_run(logged["uri"], "serving", "uris-test", {}, {})
    model_uri = tracking.log_model(logged["uri"], run_id, logged["bundle"], False)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == default and mlflow.get_registry_uri() == default
    elsewhere = f"sqlite:///{logged['tmp']}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    version = tracking.register_challenger(logged["uri"], model_uri, "uris-test", _tags(1.0, "data-u/test=1"))
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == elsewhere and mlflow.get_registry_uri() == elsewhere
    # The version went to the store asked for, read by a client that names only that store.
    assert tracking.client(logged["uri"]).get_model_version("uris-test", version).run_id == run_id


def test_pyfunc_predicts_in_a_process_without_our_package(logged, champion):
    """mlflow.pyfunc.load_model on models:/NAME@champion, in a fresh process whose path
    has no checkout of ours: the model's own code/ is what it imports."""
    script = (
        "import json, sys, mlflow.pyfunc\n"
        f"m = mlflow.pyfunc.load_model({champion!r})\n"
        f"out = {{'beam2': m.predict({SENTENCES!r}, params={{'beam_size': 2}}), "
        f"'default': m.predict({SENTENCES!r}), 'one': m.predict({SENTENCES[0]!r})}}\n"
        "out['pipeline'] = sys.modules['pipeline'].__file__\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(logged["uri"]),
        cwd=logged["tmp"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tr = logged["translator"]
    assert out["beam2"] == tr.translate(SENTENCES, beam_size=2)
    assert out["default"] == tr.translate(SENTENCES, beam_size=4) and len(out["default"]) == 3
    assert out["one"] == tr.translate(SENTENCES[:1], beam_size=4)
    assert "/code/pipeline/" in out["pipeline"], out["pipeline"]  # not /work/main's nor this checkout's


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    return status, text, time.perf_counter() - t0


def test_mlflow_models_serve_answers_invocations(logged, champion):
    port = free_port()
    log = open(logged["tmp"] / "serve.log", "w")
    proc = subprocess.Popen(
        [
            MLFLOW,
            "models",
            "serve",
            "-m",
            champion,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=_env(logged["uri"]),
        cwd=logged["tmp"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (logged["tmp"] / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "no answer on /ping within 180 s"
            time.sleep(1)
        tr = logged["translator"]
        status, text, one_s = _post(f"{base}/invocations", {"inputs": [SENTENCES[0]]})
        assert status == 200, text
        print(f"\n/invocations {{'inputs': [{SENTENCES[0]!r}]}} -> {text}")
        assert json.loads(text) == {"predictions": tr.translate(SENTENCES[:1], beam_size=4)}
        many = [SENTENCES[i % 3].replace(".", f"{'!' if i % 2 else '.'}") for i in range(64)]
        status, text, many_s = _post(f"{base}/invocations", {"inputs": many})
        assert status == 200, text
        assert json.loads(text)["predictions"] == tr.translate(many, beam_size=4)
        print(f"request to response: 1 sentence {one_s * 1000:.0f} ms, 64 sentences {many_s * 1000:.0f} ms (beam 4)")
        status, text, _ = _post(
            f"{base}/invocations", {"inputs": SENTENCES, "params": {"beam_size": 1, "batch_size": 2}}
        )
        assert status == 200, text
        # An untrained model decodes up to the length limit, which depends on the batch: batch_size took effect.
        assert json.loads(text)["predictions"] == tr.translate(SENTENCES, beam_size=1, batch_size=2)
        status, text, _ = _post(f"{base}/invocations", {"inputs": SENTENCES, "params": {"beam_size": 0}})
        assert status >= 400 and "beam_size must be >= 1" in text, (status, text)  # params reach predict
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(30)
        log.close()


def test_translate_command_on_champion(logged, champion):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "translate", "--model", champion, "--beam", "2"],
        input="\n".join(SENTENCES) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": logged["uri"]},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == logged["translator"].translate(SENTENCES, beam_size=2)
    assert "pickle" not in proc.stderr.lower()


def _version(uri, name, alias):
    return str(MlflowClient(uri).get_model_version_by_alias(name, alias).version)


def test_weak_challenger_leaves_champion_strong_one_moves_it(logged):
    uri, model_uri = logged["uri"], logged["model_uri"]
    # Strong, then weak: the champion stays.
    name = "gate-strong-first"
    v1 = tracking.register_challenger(uri, model_uri, name, _tags(31.2, "data-a/test=100"))
    assert tracking.promote_if_better(uri, name, v1, "test_bleu", "max", "data-a/test=100")[0]
    v2 = tracking.register_challenger(uri, model_uri, name, _tags(12.0, "data-a/test=100"))
    promoted, reason = tracking.promote_if_better(uri, name, v2, "test_bleu", "max", "data-a/test=100")
    print(f"\nstrong then weak: {reason}")
    assert not promoted and reason.startswith("champion: v1 (test_bleu 31.20) kept; challenger v2 (test_bleu 12.00)")
    assert (_version(uri, name, "champion"), _version(uri, name, "challenger")) == ("1", "2")
    # A better score on other test data is not comparable: the champion stays.
    v3 = tracking.register_challenger(uri, model_uri, name, _tags(50.0, "data-b/test=80"))
    promoted, reason = tracking.promote_if_better(uri, name, v3, "test_bleu", "max", "data-b/test=80")
    print(f"other data: {reason}")
    assert not promoted and "not comparable" in reason and f"pipeline promote {name} 3" in reason
    assert _version(uri, name, "champion") == "1"
    # Weak, then strong: the champion moves.
    name = "gate-weak-first"
    v1 = tracking.register_challenger(uri, model_uri, name, _tags(12.0, "data-a/test=100"))
    assert tracking.promote_if_better(uri, name, v1, "test_bleu", "max", "data-a/test=100")[0]
    v2 = tracking.register_challenger(uri, model_uri, name, _tags(31.2, "data-a/test=100"))
    promoted, reason = tracking.promote_if_better(uri, name, v2, "test_bleu", "max", "data-a/test=100")
    print(f"weak then strong: {reason}")
    assert promoted and reason == "champion moved v1 -> v2 (test_bleu 12.00 -> 31.20)"
    assert _version(uri, name, "champion") == "2"
    tags = MlflowClient(uri).get_model_version(name, "2").tags
    assert tags["promotion_reason"].startswith("beat v1") and tags[tracking.SWEEP_TAG] == "test-sweep"


def test_sweep_registration_tags_and_gates(logged):
    """The sweep's side (tune._register): tags from the sweep, the data fingerprint from
    the preprocessed folder and the test count, then the gate."""
    from pipeline.train.run import Prepared
    from pipeline.tune import _register

    uri = logged["uri"]
    cfg = load_config(["data=demo_text", "tune.register_as=gate-sweep"])
    # What _register reads of a prepared run (no storage, tokenizers or vocabulary needed).
    prep = Prepared(
        uri=uri,
        experiment="serving",
        storage="",
        data_dir="/data/demo_text-0123abcd",
        manifest={"splits": {"test": {"kept": 100}}},
        src_json="",
        tgt_json="",
        vocab=Vocab(0, 0, False),
    )
    first = _register(
        cfg, prep, "sweep-a", "sweep-a-t1", "val_bleu", {"model_uri": logged["model_uri"], "test_bleu": 31.2}
    )
    weak = _register(
        cfg, prep, "sweep-b", "sweep-b-t1", "val_bleu", {"model_uri": logged["model_uri"], "test_bleu": 0.0}
    )
    assert first["promoted"] and not weak["promoted"] and weak["champion_version"] == "1"
    assert weak["promotion"].startswith("champion: v1 (test_bleu 31.20) kept; challenger v2 (test_bleu 0.00)")
    tags = MlflowClient(uri).get_model_version("gate-sweep", weak["registered_version"]).tags
    assert tags[tracking.SWEEP_TAG] == "sweep-b" and tags[tracking.METRIC_TAG] == "test_bleu"
    assert float(tags[tracking.VALUE_TAG]) == 0.0 and tags[tracking.DATA_TAG] == "demo_text-0123abcd/test=100"
    assert tags[tracking.COMMIT_TAG]


def test_promote_command_moves_champion_and_records_who_and_why(logged):
    uri, name = logged["uri"], "gate-by-hand"
    for value in (31.2, 12.0):
        v = tracking.register_challenger(uri, logged["model_uri"], name, _tags(value, "data-a/test=100"))
        tracking.promote_if_better(uri, name, v, "test_bleu", "max", "data-a/test=100")
    assert _version(uri, name, "champion") == "1"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "promote",
        name,
        "2",
        "--reason",
        "better on the new test set",
        "--tracking-uri",
        uri,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"champion of {name}: v1 -> v2" in proc.stdout
    assert _version(uri, name, "champion") == "2"
    tags = MlflowClient(uri).get_model_version(name, "2").tags
    assert tags["promoted_by"] == getpass.getuser() and tags["promotion_reason"] == "better on the new test set"
    assert tags["promoted_at"].endswith("Z")
    proc = subprocess.run(cmd[:5] + ["9"] + cmd[6:], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"'{name}' has no version 9" in proc.stderr and "versions: 1, 2" in proc.stderr
    assert _version(uri, name, "champion") == "2"
