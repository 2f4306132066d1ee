"""End to end on a real local Ray cluster and a real MLflow store: 2-worker training,
resume, the MLflow record, and using the logged model."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.tracking import MlflowClient

import notebooks
from pipeline import tracking
from pipeline.config import ConfigError, load_config
from pipeline.inference import Translator
from pipeline.tracking import git_commit
from pipeline.train.run import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{tmp}/mlflow.db"
    overrides = [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=4000",
        "data.vocab_size=500",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        "train.run_name=e2e",
        "train.num_workers=2",
        "train.max_epochs=1",
        "train.batch_tokens=600",
        "train.test_beam_size=2",
        "train.lr=0.01",
        "train.warmup_steps=20",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=e2e-test",
        # A config value with fake credentials in it (unused by text data, and not part of
        # the data folder's hash): it reaches params and config.yaml, redacted.
        f"data.feature_cache={PLANTED_VALUE}",
    ]
    # Fake secrets in the environment, as a cluster's MLflow and object-store credentials
    # would be: test_no_secret_leaks scans everything the runs wrote for them.
    saved = {k: os.environ.get(k) for k in FAKE_SECRETS}
    os.environ.update(FAKE_SECRETS)
    sigint_before = signal.getsignal(signal.SIGINT)
    try:
        first = run_training(load_config(overrides))
        steps_first = _metric_steps(uri, first["run_id"], "val_bleu")
        # As if the driver had been killed in the moment between a worker uploading its
        # checkpoint and Ray's controller recording it: the resume must find it by listing.
        (tmp / "ray" / "e2e" / "checkpoint_manager_snapshot.json").unlink()
        # Same run name again with one more epoch: resumes from the checkpoint into the same MLflow run.
        second = run_training(load_config(overrides + ["train.max_epochs=4"]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    output = capfd_text(request)
    return {
        "uri": uri,
        "tmp": tmp,
        "first": first,
        "second": second,
        "steps_first": steps_first,
        "output": output,
        "sigint": (sigint_before, signal.getsignal(signal.SIGINT)),
    }


FAKE_SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-7d1f3a",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-key-9c2e4b",
    "AWS_ACCESS_KEY_ID": "FAKEAKIA0000SECRET",
}
PLANTED_VALUE = "s3://AKIAFAKE:fake-cfg-secret-5e8a@bucket/cache?X-Amz-Signature=fake-cfg-sig-3b7c"
PLANTED_SECRETS = {"config password": "fake-cfg-secret-5e8a", "config signature": "fake-cfg-sig-3b7c"}


def capfd_text(request) -> str:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    out, err = capman.read_global_capture() if capman else ("", "")
    if capman:  # put it back for pytest's own report
        import sys as _sys

        _sys.stdout.write(out)
        _sys.stderr.write(err)
    return out + err


def test_no_secret_leaks_into_mlflow_checkpoints_or_output(trained):
    """Secret values from the environment, and secrets inside a config value, are in no
    param, tag, metric, artifact, checkpoint or printed line (the MLflow store and the Ray
    storage are scanned as bytes)."""
    secrets = {**FAKE_SECRETS, **PLANTED_SECRETS}
    hits = []
    for path in trained["tmp"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {k}" for k, v in secrets.items() if v.encode() in data]
    hits += [f"output: {k}" for k, v in secrets.items() if v in trained["output"]]
    assert not hits, hits
    params = MlflowClient(trained["uri"]).get_run(trained["first"]["run_id"]).data.params
    assert len(params) > 50  # the scan looked at a store with the run's params in it
    assert params["data.feature_cache"] == "s3://AKIAFAKE:***@bucket/cache?X-Amz-Signature=***"


def test_a_finished_run_leaves_no_train_actors_and_ctrl_c_to_the_program(trained):
    """Ray Train's fit() leaves its SIGINT handler installed, holding the controller's handle:
    the controller and its data actors outlived the fit (through the test decode and the
    model's logging, and into the next run), and a Ctrl-C after training went to them."""
    from ray.util.state import list_actors

    before, after = trained["sigint"]
    assert after is before, f"SIGINT handler after the runs: {after!r}"
    deadline = time.time() + 30
    while True:
        left = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)]
        left = [n for n in left if n in ("TrainController", "DatasetManager", "SplitCoordinator")]
        if not left or time.time() > deadline:
            break
        time.sleep(1)
    assert not left, f"still alive after the runs: {left}"


def _metric_steps(uri, run_id, key):
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_resume_continues_step_count_in_same_run(trained):
    first, second = trained["first"], trained["second"]
    assert second["run_id"] == first["run_id"]
    steps = _metric_steps(trained["uri"], first["run_id"], "val_bleu")
    assert len(trained["steps_first"]) == 1 and len(steps) == 4
    assert steps == sorted(set(steps)) and steps[0] == trained["steps_first"][0] > 0
    train_steps = _metric_steps(trained["uri"], first["run_id"], "train_loss")
    assert train_steps == sorted(set(train_steps)), "no duplicate or out-of-order steps"


def test_mlflow_run_has_params_metrics_artifacts(trained):
    c = MlflowClient(trained["uri"])
    run = c.get_run(trained["first"]["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.hidden_size"] == "128" and p["train.num_workers"] == "2" and p["data.name"] == "demo_text"
    assert set(load_config([]).flat()) <= set(p)
    for key in (
        "train_loss",
        "lr",
        "val_loss",
        "val_ppl",
        "val_bleu",
        "train_tokens_per_s",
        "padding_fraction",
        "train_tflops",
        "test_bleu",
        "test_chrf",
        "data_rows_read",
    ):
        assert key in run.data.metrics, key
    assert 0 <= run.data.metrics["padding_fraction"] < 0.5
    assert run.data.metrics["train_tokens_per_s"] > 0
    assert run.data.tags["ray.run_name"] == "e2e"
    top = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "best_checkpoint", "samples"} <= top
    assert {a.path for a in c.list_artifacts(run.info.run_id, "best_checkpoint")} >= {
        "best_checkpoint/model.pt",
        "best_checkpoint/model.json",
    }
    local = c.download_artifacts(run.info.run_id, "samples/test_translations.json", str(trained["tmp"]))
    table = json.load(open(local))
    assert table["columns"] == ["source", "reference", "translation"] and len(table["data"]) == 5


def test_run_lists_its_splits_as_datasets_and_the_test_scores_belong_to_the_model(trained):
    """Lineage: the train/val/test Parquet folders are the run's dataset inputs (digest: the
    preprocessing hash; logged once, not again on resume), and the test scores are the logged
    model's metrics, measured on the test dataset."""
    c = MlflowClient(trained["uri"])
    res = trained["second"]
    data_dir = res["data_dir"].rstrip("/")
    name, digest = os.path.basename(data_dir), os.path.basename(data_dir).rsplit("-", 1)[-1]
    inputs = c.get_run(res["run_id"]).inputs.dataset_inputs
    by_context = {t.value: i.dataset for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert len(inputs) == 3 and set(by_context) == {"train", "val", "test"}
    for split, ds in by_context.items():
        assert ds.name == f"{name}/{split}" and ds.digest == digest and ds.source_type == "local"
        assert json.loads(ds.source)["uri"] == f"{data_dir}/{split}"
    model = c.get_logged_model(res["model_uri"].removeprefix("models:/"))
    scores = {m.key: m for m in model.metrics}
    assert set(scores) >= {"test_bleu", "test_chrf"}
    assert scores["test_bleu"].value == pytest.approx(res["test_bleu"])
    assert scores["test_bleu"].dataset_name == f"{name}/test" and scores["test_bleu"].dataset_digest == digest


def test_review_run_notebook_and_the_run_in_the_mlflow_ui(trained):
    """The run as MLflow 3's UI shows it (experiment kind, context tags, the logged model, the
    review figures as images), and notebooks/review_run.ipynb executed against it shows the
    same figures."""
    uri, res, tmp = trained["uri"], trained["second"], trained["tmp"]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("e2e-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = c.get_run(res["run_id"]).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags["mlflow.source.git.commit"] == git_commit() and len(git_commit()) == 40
    assert {m.source_run_id for m in c.search_logged_models([exp.experiment_id])} == {res["run_id"]}
    logged = {a.path for a in c.list_artifacts(res["run_id"], "review")}
    figures = {f"review/{name}" for name in ("learning_curves.png", "bleu_by_length.png", "attention.png")}
    assert figures | {"review/worst_best.json"} <= logged, logged
    for f in figures:
        assert open(c.download_artifacts(res["run_id"], f, str(tmp)), "rb").read(4) == b"\x89PNG"
    table = json.load(open(c.download_artifacts(res["run_id"], "test/outputs.json", str(tmp))))
    manifest = json.load(open(f"{res['data_dir']}/manifest.json"))
    assert table["columns"] == ["source", "reference", "translation"]
    assert len(table["data"]) == manifest["splits"]["test"]["kept"]

    nb = notebooks.execute("review_run.ipynb", {"TRACKING_URI": uri, "EXPERIMENT": "e2e-test", "RUN": "e2e"}, tmp)
    assert not notebooks.errors(nb), notebooks.errors(nb)
    assert notebooks.images(nb) >= 3  # learning curves, BLEU by length, attention maps
    text = notebooks.text(nb)
    assert "worst test sentences" in text and "best test sentences" in text and "sentence_bleu" in text
    assert all(f in text for f in figures)  # what the run holds for the MLflow UI


def test_model_learned_something(trained):
    run = MlflowClient(trained["uri"]).get_run(trained["second"]["run_id"])
    assert run.data.metrics["test_bleu"] > 5.0, run.data.metrics  # a random model scores ~0


def test_logged_model_loads_and_translates(trained):
    model_uri = trained["second"]["model_uri"]
    # MLflow's own API, no code of ours imported by hand: the pyfunc translates as the bundle does.
    with tracking.fluent_store(trained["uri"]):
        model = mlflow.pyfunc.load_model(model_uri)
    bundle = Translator.load(trained["second"]["best_dir"])
    sentences = "the small dog sees the red house .\nthe woman runs quickly .\n"
    assert model.predict(sentences.splitlines(), params={"beam_size": 2}) == bundle.translate(sentences.splitlines(), 2)
    env_uri = {"MLFLOW_TRACKING_URI": trained["uri"]}
    outs = []
    for location in (model_uri, trained["second"]["best_dir"]):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "translate", "--model", location, "--beam", "2"],
            input=sentences,
            capture_output=True,
            text=True,
            timeout=300,
            env={**__import__("os").environ, **env_uri},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout.splitlines())
    assert len(outs[0]) == 2 and all(outs[0]) and outs[0] == outs[1]


def test_evaluate_command_scores_the_model(trained):
    tmp = trained["tmp"]
    args = [
        "evaluate",
        "--model",
        trained["second"]["best_dir"],
        "--split",
        "test",
        "--beam",
        "1",
        "data=demo_text",
        f"data.root={tmp}/demo",
        "data.demo_size=4000",
        "data.vocab_size=500",
        f"data.output_dir={tmp}/data",
    ]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["split"] == "test" and res["sentences"] > 50 and res["bleu"] > 5.0


def test_a_small_test_split_decodes_in_the_driver_as_on_the_actor_pool(trained):
    """decode_split: a split of at most one decoding batch is decoded in this process, a larger
    one on Ray Data's actor pool (here_rows=0 forces it); the same rows and outputs either way."""
    from pipeline.evaluation import _small_split, decode_split
    from pipeline.tasks import TranslationTask

    task, split = TranslationTask(), f"{trained['first']['data_dir']}/test"
    assert _small_split(split, task.test_columns, task.test_batch_size) is not None  # one batch: decoded here
    here = decode_split(task, trained["second"]["best_dir"], split, 1, 0.6)
    pool = decode_split(task, trained["second"]["best_dir"], split, 1, 0.6, here_rows=0)
    assert len(here["src"]) > 50 and here["src"] == pool["src"] and here["tgt"] == pool["tgt"]
    # Greedy outputs; two processes' float rounding (thread counts) may flip a rare tie.
    differ = sum(a != b for a, b in zip(here["hyp"], pool["hyp"]))
    assert len(here["hyp"]) == len(pool["hyp"]) and differ <= len(here["hyp"]) // 50, differ


def test_checkpoint_of_another_config_is_refused_naming_keys(trained):
    tmp = trained["tmp"]
    overrides = [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=4000",
        "data.vocab_size=500",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        "train.run_name=e2e",
        "train.num_workers=1",
        "train.max_epochs=5",
        "model.hidden_size=64",
        f"tracking.tracking_uri={trained['uri']}",
        "tracking.experiment=e2e-test",
    ]
    # The run's fingerprint refuses it before training, naming the key that differs.
    with pytest.raises(ConfigError, match="model.hidden_size: 128 != 64"):
        run_training(load_config(overrides))
    # A run folder from before fingerprints (none recorded): the checkpoint's shapes still refuse it.
    fingerprint = tmp / "ray" / "e2e" / "run_fingerprint.json"
    saved = fingerprint.read_text()
    fingerprint.unlink()
    try:
        with pytest.raises(Exception) as info:
            run_training(load_config(overrides))
    finally:
        fingerprint.write_text(saved)
    text = str(info.value)
    assert "does not fit this model config; mismatched keys" in text and "decoder.lstm.weight_ih_l0" in text
