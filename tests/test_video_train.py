"""Video captioning end to end on a real local Ray cluster and MLflow store: real mp4 clips
generated, decoded with PyAV on Ray Data, a 2-worker Ray Train run that learns, the
captioning metrics and contact sheet in MLflow, and `pipeline caption` on a clip file."""

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline import metrics
from pipeline.config import load_config
from pipeline.data.synthetic_video import parse_caption
from pipeline.train.run import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    # A fixed amount of work, not of time: 13 epochs of 14 steps (the batches the recipe would size
    # for 384 clips are 250 tokens, 3x the steps; its 300 warmup steps would keep the learning
    # rate low for the whole run).
    tmp = tmp_path_factory.mktemp("video")
    uri = f"sqlite:///{tmp}/mlflow.db"
    overrides = [
        "data=demo_video",
        f"data.root={tmp}/demo",
        "data.demo_size=384",
        f"data.output_dir={tmp}/data",
        f"data.feature_cache={tmp}/cache",
        "data.frame_size=48",
        f"train.storage_path={tmp}/ray",
        "train.run_name=video-e2e",
        "train.num_workers=2",
        "train.max_minutes=10",
        "train.max_epochs=13",
        "train.warmup_steps=20",
        "train.batch_tokens=800",
        "train.test_beam_size=2",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=video-test",
    ]
    res = run_training(load_config(overrides))
    return {"uri": uri, "tmp": tmp, "res": res}


def test_captioner_learns_beyond_a_constant_caption(trained):
    run = MlflowClient(trained["uri"]).get_run(trained["res"]["run_id"])
    m = run.data.metrics
    for key in (
        "val_cider",
        "val_bleu4",
        "val_rouge_l",
        "best_val_cider",
        "test_cider",
        "test_bleu4",
        "test_rouge_l",
        "train_loss",
        "train_tokens_per_s",
        "data_wait_fraction",
        "data_videos_kept",
        "data_cache_hits",
    ):
        assert key in m, key
    # The best constant caption on this corpus: every test clip gets the same sentence.
    out = json.loads(open(f"{trained['res']['data_dir']}/manifest.json").read())
    assert out["videos"]["kept"] == m["data_videos_kept"]
    samples = MlflowClient(trained["uri"]).download_artifacts(
        run.info.run_id, "samples/test_captions.json", str(trained["tmp"])
    )
    refs = [r.split(" | ") for r in (row[1] for row in json.load(open(samples))["data"])]
    constant = metrics.caption_scores(["a small red circle moves to the left"] * len(refs), refs)["cider"]
    assert m["test_cider"] > constant + 0.5, (m["test_cider"], constant)


def test_each_epoch_prints_its_own_loss_and_speed(trained):
    # 14 steps an epoch, fewer than a log window (20): each epoch's "done" line still has its own
    # figures (it showed "loss 0.000, 0 tokens/s" first and then repeated the last window's).
    log = trained["tmp"] / "ray" / "video-e2e" / "logs" / "console.log"
    done = [
        json.loads(line.split("[progress] ", 1)[1])
        for line in log.read_text().splitlines()
        if "[progress] " in line and '"done": true' in line
    ]
    assert [p["epoch"] for p in done] == list(range(1, 14)), done
    assert all(p["loss"] > 0.5 and p["tokens_per_s"] > 0 for p in done), done
    losses = [p["loss"] for p in done]
    assert len(set(losses)) == len(losses) and losses[-1] < losses[0], losses


def test_mlflow_has_contact_sheet_and_captions(trained):
    c = MlflowClient(trained["uri"])
    run_id = trained["res"]["run_id"]
    names = {a.path for a in c.list_artifacts(run_id, "samples")}
    assert {"samples/test_contact_sheet.png", "samples/test_captions.json"} <= names
    png = c.download_artifacts(run_id, "samples/test_contact_sheet.png", str(trained["tmp"]))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = json.load(open(c.download_artifacts(run_id, "samples/test_captions.json", str(trained["tmp"]))))
    assert table["columns"] == ["video_id", "references", "caption"] and len(table["data"]) == 6


def test_caption_command_on_clip_files(trained):
    ann = json.load(open(f"{trained['tmp']}/demo/train_val_videodatainfo.json"))
    test_ids = [v["video_id"] for v in ann["videos"] if v["split"] == "test"][:4]
    clips = [f"{trained['tmp']}/demo/videos/{v}.mp4" for v in test_ids]
    for model in (trained["res"]["best_dir"], trained["res"]["model_uri"]):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "caption", "--model", model, "--beam", "2", *clips],
            capture_output=True,
            text=True,
            timeout=300,
            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": trained["uri"]},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.strip().splitlines()
        assert [line.split("\t")[0] for line in lines] == clips
        assert all(parse_caption(line.split("\t")[1]) for line in lines)  # words of the corpus, not noise
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "translate", "--model", trained["res"]["best_dir"]],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "video captioning model: use `pipeline caption`" in proc.stderr
