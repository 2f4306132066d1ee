"""Sweeps on a real local Ray cluster with a real MLflow store: a 2x2 grid with ASHA,
the parent/child record, the champion alias, the report and the review notebook, and a
sweep whose driver is killed and then resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import ctrl_c_when
from mlflow.tracking import MlflowClient

import notebooks
from pipeline.config import ConfigError, load_config
from pipeline.tracking import git_commit
from pipeline.tune import run_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def base_overrides(tmp, uri, experiment):
    return [
        "data=demo_text",
        "model=small",
        f"data.root={tmp}/demo",
        "data.demo_size=3000",
        "data.vocab_size=400",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        "train.num_workers=1",
        "train.batch_tokens=600",
        "train.lr=0.01",
        "train.warmup_steps=20",
        "train.test_beam_size=1",
        f"tracking.tracking_uri={uri}",
        f"tracking.experiment={experiment}",
    ]


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(
        base_overrides(tmp, uri, "sweeps")
        + [
            "tune.name=grid",
            "tune.search=grid",
            "tune.space.model.hidden_size=[8,96]",
            "tune.space.model.num_layers=[1,2]",
            "train.max_epochs=3",
            "tune.scheduler=asha",
            "tune.grace_period=1",
            "tune.reduction_factor=2",
            "tune.max_concurrent_trials=2",
            "tune.register_as=demo-champion",
        ]
    )
    res = run_sweep(cfg)
    return {"uri": uri, "tmp": tmp, "res": res}


def children_of(uri, parent_id):
    c = MlflowClient(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_grid_leaves_one_parent_and_four_children(sweep):
    uri, res = sweep["uri"], sweep["res"]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sweeps").experiment_id
    parents = [r for r in c.search_runs([exp]) if r.data.tags.get("pipeline.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == res["parent_run_id"]
    kids = children_of(uri, res["parent_run_id"])
    assert len(kids) == 4
    combos = sorted((int(k.data.params["model.hidden_size"]), int(k.data.params["model.num_layers"])) for k in kids)
    assert combos == [(8, 1), (8, 2), (96, 1), (96, 2)]
    for k in kids:
        assert "val_bleu" in k.data.metrics and "train_loss" in k.data.metrics
        assert k.info.status in ("FINISHED", "KILLED")
    assert parents[0].data.params["tune.search"] == "grid"
    assert json.loads(parents[0].data.params["tune.space"]) == {
        "model.hidden_size": [8, 96],
        "model.num_layers": [1, 2],
    }


def test_asha_stopped_at_least_one_trial(sweep):
    kids = children_of(sweep["uri"], sweep["res"]["parent_run_id"])
    stopped = [k for k in kids if k.data.tags.get("tune.early_stopped") == "true"]
    assert stopped, [(k.data.params["model.hidden_size"], k.info.status) for k in kids]
    hist = MlflowClient(sweep["uri"]).get_metric_history
    assert all(len(hist(k.info.run_id, "val_bleu")) < 3 for k in stopped)


def test_champion_alias_on_best_trial(sweep):
    res, c = sweep["res"], MlflowClient(sweep["uri"])
    ranked = sorted(res["trials"], key=lambda r: -r["best"])
    assert res["best"]["run_id"] == ranked[0]["run_id"]
    mv = c.get_model_version_by_alias("demo-champion", "champion")
    assert mv.run_id == ranked[0]["run_id"]
    # The first sweep into a registered model: its challenger becomes champion, tagged.
    assert res["promoted"] and mv.version == c.get_model_version_by_alias("demo-champion", "challenger").version
    assert mv.tags["pipeline.sweep"] == "grid" and mv.tags["pipeline.metric"] == "test_bleu"
    assert float(mv.tags["pipeline.metric_value"]) == c.get_run(mv.run_id).data.metrics["test_bleu"]
    assert mv.tags["pipeline.data_fingerprint"].split("/test=")[0] in os.listdir(sweep["tmp"] / "data")
    best_bleu = max(m.value for m in c.get_metric_history(mv.run_id, "val_bleu"))
    for k in children_of(sweep["uri"], res["parent_run_id"]):
        assert max(m.value for m in c.get_metric_history(k.info.run_id, "val_bleu")) <= best_bleu
    assert "test_bleu" in c.get_run(mv.run_id).data.metrics


def test_report_writes_pngs(sweep):
    out = sweep["tmp"] / "report"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "report",
            "--sweep",
            "grid",
            "--out",
            str(out),
            f"tracking.tracking_uri={sweep['uri']}",
            "tracking.experiment=sweeps",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    from PIL import Image

    for name in ("heatmap.png", "learning_curves.png"):
        img = Image.open(out / name)
        assert img.size[0] > 200 and img.size[1] > 150
        assert len(img.convert("RGB").resize((50, 50)).getcolors(2500)) > 10  # not a blank canvas
    summary = (out / "summary.md").read_text()
    assert summary.count("\n| ") >= 5 and "stopped early" in summary


def test_review_notebook_executes(sweep):
    nb = notebooks.execute(
        "review_sweep.ipynb",
        {
            "TRACKING_URI": sweep["uri"],
            "EXPERIMENT": "sweeps",
            "SWEEP": "grid",
            "EXAMPLES": ["the small dog sees the red house .", "a woman runs quickly ."],
        },
        sweep["tmp"],
    )
    assert not notebooks.errors(nb), notebooks.errors(nb)
    assert notebooks.images(nb) >= 2
    text = notebooks.text(nb)
    assert "champion: demo-champion" in text and "->" in text
    res = sweep["res"]
    assert f"test_bleu {res['test_bleu']:.3f}" in text  # the best trial's test metrics
    assert "translation" in text and "reference" in text  # its sample table
    for t in res["trials"]:  # a sqlite store: the runs are named by id
        assert t["run_id"] in text


def test_sweep_in_the_mlflow_ui(sweep):
    """What MLflow 3's UI reads: the experiment's kind, the runs' context tags (User, Source,
    Version columns), datasets and the best trial's logged model, the report figures on the
    parent, and the searched keys as tags of each child."""
    uri, res = sweep["uri"], sweep["res"]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sweeps")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = c.get_run(res["parent_run_id"])
    kids = children_of(uri, res["parent_run_id"])
    for run in [parent, *kids]:
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL", tags
        # The sweep's driver (this pytest process), not the Ray worker a trial ran in.
        assert tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        assert "default_worker" not in tags["mlflow.source.name"]
        assert tags["mlflow.source.git.commit"] == git_commit() and len(git_commit()) == 40
        assert {i.dataset.name.rsplit("/", 1)[1] for i in run.inputs.dataset_inputs} == {"train", "val", "test"}
    assert parent.data.tags["tune.searched"] == "model.hidden_size,model.num_layers"
    for k in kids:
        t = k.data.tags
        assert t["tune.searched"] == "model.hidden_size,model.num_layers"
        assert t["tune.param.model.hidden_size"] == k.data.params["model.hidden_size"]
        assert t["tune.param.model.num_layers"] == k.data.params["model.num_layers"]
    models = c.search_logged_models([exp.experiment_id])
    assert [m.source_run_id for m in models] == [res["best"]["run_id"]]
    figs = {a.path for a in c.list_artifacts(res["parent_run_id"], "report")}
    assert figs == {"report/heatmap.png", "report/learning_curves.png"}
    for f in figs:
        assert open(c.download_artifacts(res["parent_run_id"], f, str(sweep["tmp"])), "rb").read(4) == b"\x89PNG"


def test_invalid_search_space_is_named():
    with pytest.raises(
        ConfigError,
        match="tune.space.model.hiden_size: .*unknown config key 'model.hiden_size'|unknown config key 'model.hiden_size'",
    ):
        load_config(["tune.space.model.hiden_size=[1,2]"])
    with pytest.raises(ConfigError, match="tune.space.train.lr: loguniform needs low > 0"):
        load_config(["tune.space.train.lr={loguniform: [0, 1]}", "tune.search=random"])
    with pytest.raises(ConfigError, match="tune.search=grid needs lists"):
        load_config(["tune.space.train.lr={uniform: [0.001, 0.01]}"])
    with pytest.raises(ConfigError, match="model.hidden_size must be of type int"):
        load_config(["tune.space.model.hidden_size=[32, big]"])


def tune_command(ray_session, tmp, uri, experiment, *extra):
    """`pipeline tune` (no scheduler) as a program joining the session's cluster: its args,
    its environment and a client of its store, whose tables are made here (polling the store
    while the sweep made them raced it)."""
    args = [sys.executable, "-m", "pipeline.cli", "tune", *base_overrides(tmp, uri, experiment), "tune.scheduler=none"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    c = MlflowClient(uri)
    c.search_experiments()
    return args + list(extra), env, c


def test_killed_sweep_resumes_without_duplicates(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args, env, c = tune_command(
        ray_session,
        tmp_path,
        uri,
        "resume",
        "tune.name=killed",
        "tune.space.model.hidden_size=[32,64]",
        "tune.max_concurrent_trials=2",
        "train.max_epochs=2",
    )
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:  # kill the driver once the first trial has logged a training step
            exp = c.get_experiment_by_name("resume")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if any("train_loss" in r.data.metrics for r in runs if r.data.tags.get("mlflow.parentRunId")):
                break
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(2)
        else:
            pytest.fail("no trial started within 400 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    exp = c.get_experiment_by_name("resume").experiment_id
    parents = [r for r in c.search_runs([exp]) if r.data.tags.get("pipeline.kind") == "sweep"]
    assert len(parents) == 1
    kids = children_of(uri, parents[0].info.run_id)
    names = [k.data.tags["pipeline.run_name"] for k in kids]
    assert len(kids) == 2 and len(set(names)) == 2, names
    assert all(k.info.status == "FINISHED" for k in kids)
    steps = [m.step for m in c.get_metric_history(kids[0].info.run_id, "val_bleu")]
    assert steps == sorted(set(steps))
    # The trial cut short (killed before its first checkpoint) started again from step 0 and
    # logged none of its steps twice.
    from pipeline.train.loop import LOG_EVERY

    for k in kids:
        train = [m.step for m in c.get_metric_history(k.info.run_id, "train_loss")]
        assert train == list(range(LOG_EVERY, LOG_EVERY * len(train) + 1, LOG_EVERY)), (names, train)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_ends_a_sweep_as_killed_without_a_champion(ray_session, tmp_path, sig):
    """Ctrl-C (SIGINT to the driver's process group) once a trial has validated: Tune saves
    the sweep and returns; nothing is tested or registered from part of a sweep, the parent
    and the trial are KILLED, the driver exits 130 naming the tune.name to go on with. Before,
    the sweep was summed up as if done: the trial "stopped early", a champion, exit 0.
    SIGTERM (`kill`, `pipeline jobs stop`, a pod deleted) is the same; before, ray.init's
    handler made it sys.exit(15) with the parent and the trial left RUNNING."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args, env, c = tune_command(
        ray_session,
        tmp_path,
        uri,
        "ctrl-c",
        "tune.name=ctrl-c",
        "tune.space.model.hidden_size=[32]",
        "tune.register_as=ctrl-c-model",
        "train.max_epochs=20",
    )

    def validated():
        exp = c.get_experiment_by_name("ctrl-c")
        runs = c.search_runs([exp.experiment_id]) if exp else []
        return any("val_bleu" in r.data.metrics for r in runs if r.data.tags.get("mlflow.parentRunId"))

    rc, out = ctrl_c_when(args, env, validated, "a trial's validation", sig=sig)
    assert rc == 130, out[-3000:]
    assert "[tune] interrupted: 0 trial(s) ended, 1 stopped while training; nothing was tested" in out, out
    assert "tune.name=ctrl-c" in out
    runs = c.search_runs([c.get_experiment_by_name("ctrl-c").experiment_id])
    assert sorted((r.data.tags.get("pipeline.kind", "trial"), r.info.status) for r in runs) == [
        ("sweep", "KILLED"),
        ("trial", "KILLED"),
    ]
    assert all("test_bleu" not in r.data.metrics and "tune.early_stopped" not in r.data.tags for r in runs)
    registry = MlflowClient(uri, registry_uri=uri)
    assert not registry.search_registered_models(), "a model was registered from an interrupted sweep"


def test_sweep_name_refuses_a_changed_search_space(sweep):
    """The same tune.name with another search space (or other data) fails before any trial,
    naming what differs; nothing is added to the sweep's MLflow record."""
    tmp, uri = sweep["tmp"], sweep["uri"]
    cfg = load_config(
        base_overrides(tmp, uri, "sweeps")
        + [
            "tune.name=grid",
            "tune.search=grid",
            "tune.space.model.hidden_size=[8,32]",
            "tune.space.model.num_layers=[1,2]",
            "train.max_epochs=3",
            "tune.scheduler=asha",
            "tune.grace_period=1",
            "tune.reduction_factor=2",
            "tune.max_concurrent_trials=2",
            "tune.register_as=demo-champion",
        ]
    )
    with pytest.raises(ConfigError, match=r"tune.name 'grid'.*\n  tune.space: .*96.* != .*32"):
        run_sweep(cfg)
    assert len(children_of(uri, sweep["res"]["parent_run_id"])) == 4


def test_review_notebook_on_a_video_sweep(ray_session, tmp_path):
    """A one-trial captioning sweep on a tiny demo video corpus: the review notebook shows
    the best trial's test CIDEr and its test captions, not translations."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        [
            "data=demo_video",
            f"data.root={tmp_path}/demo",
            "data.demo_size=48",
            "data.frame_size=32",
            f"data.output_dir={tmp_path}/data",
            f"data.feature_cache={tmp_path}/cache",
            f"train.storage_path={tmp_path}/ray",
            "train.num_workers=1",
            "train.max_epochs=1",
            "train.warmup_steps=5",
            "train.test_beam_size=1",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment=video-sweeps",
            "tune.name=video",
            "tune.search=grid",
            "tune.space.model.hidden_size=[16]",
            "tune.scheduler=none",
            "tune.max_concurrent_trials=1",
        ]
    )
    res = run_sweep(cfg)
    nb = notebooks.execute(
        "review_sweep.ipynb", {"TRACKING_URI": uri, "EXPERIMENT": "video-sweeps", "SWEEP": "video"}, tmp_path
    )
    assert not notebooks.errors(nb), notebooks.errors(nb)
    text = notebooks.text(nb)
    assert f"test_cider {res['test_cider']:.3f}" in text
    assert "caption" in text and "references" in text and "translation" not in text
    assert "a video captioning model" in text and "champion:" in text
