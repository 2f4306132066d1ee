"""Preprocessing outputs: staged and published whole, replaced (never appended to) under
--force, never reused after an interrupted write, built by one process at a time; demo
generators that write only into folders they own. Real Ray, real mp4s, real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.output import DEMO_MARKER, output_dir, publish, read_manifest, remove_leftovers
from pipeline.data.preprocess import ensure_demo_corpus
from pipeline.data.readers import DataError
from pipeline.data.synthetic_video import write_demo_video
from pipeline.data.video_preprocess import ensure_demo_video
from pipeline.tasks import preprocess

SPLITS = ("train", "val", "test")


def shard_rows(out):
    return {s: sum(pq.read_metadata(p).num_rows for p in Path(out, s).glob("*.parquet")) for s in SPLITS}


def leftovers(out):
    return sorted(p.name for p in Path(out).parent.glob(Path(out).name + ".*") if not p.name.endswith(".lock"))


@pytest.mark.parametrize("base", ["local", "memory://"])
def test_publish_replaces_whole_and_the_manifest_marks_completion(tmp_path, base):
    root = str(tmp_path) if base == "local" else f"memory://{tmp_path.name}"
    fs, _ = fsspec.core.url_to_fs(root)
    out = f"{root}/demo-en-de-abc"
    for run, files in enumerate((["train/a.parquet", "train/b.parquet"], ["train/c.parquet"])):
        staging = f"{out}.staging-{run}"
        for f in files:
            with fsspec.open(f"{staging}/{f}", "wb") as fh:
                fh.write(b"x")
        assert read_manifest(out) is None or run == 1
        publish(staging, out, {"format": 1, "run": run})
        assert read_manifest(out)["run"] == run and not fs.exists(fsspec.core.url_to_fs(staging)[1])
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(fsspec.core.url_to_fs(out)[1])) == [
        "c.parquet",
        "manifest.json",
    ]
    # A manifest that is cut short, or names another output, is not trusted.
    with fsspec.open(f"{out}/manifest.json", "w") as f:
        f.write('{"format": 1, "outp')
    assert read_manifest(out) is None
    with fsspec.open(f"{out}/manifest.json", "w") as f:
        json.dump({"format": 1, "output": "other-folder"}, f)
    assert read_manifest(out) is None
    with fsspec.open(f"{out}.staging-crashed/train/x.parquet", "wb") as f:
        f.write(b"half")
    assert [p.rsplit("/", 1)[-1] for p in remove_leftovers(out)] == ["demo-en-de-abc.staging-crashed"]


@pytest.mark.slow
def test_force_twice_text_replaces_the_shards(ray_session, tmp_path):
    cfg = load_config(
        [
            "data=demo_text",
            f"data.root={tmp_path}/demo",
            "data.demo_size=1500",
            "data.vocab_size=300",
            f"data.output_dir={tmp_path}/out",
        ]
    ).data
    for _ in range(2):
        out, m = preprocess(cfg, force=True)
        assert shard_rows(out) == {s: m["splits"][s]["kept"] for s in SPLITS}
    assert leftovers(out) == [] and read_manifest(out) == m


def video_cfg(root, tmp, *extra):
    return load_config(
        [
            "data=demo_video",
            f"data.root={root}",
            f"data.output_dir={tmp}/out",
            f"data.feature_cache={tmp}/cache",
            "data.num_frames=4",
            "data.frame_size=32",
            *extra,
        ]
    ).data


@pytest.fixture(scope="module")
def small_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("vid") / "corpus"
    write_demo_video(str(root), n_train=12, n_val=4, n_test=4, seed=3, size=64, num_frames=16)
    return root


@pytest.mark.slow
def test_force_twice_video_replaces_the_shards(ray_session, small_video, tmp_path):
    """Seen on main: the second --force appended a second copy of every row (write_parquet)."""
    cfg = video_cfg(small_video, tmp_path)
    for _ in range(2):
        out, m = preprocess(cfg, force=True)
        assert shard_rows(out) == {s: m["splits"][s]["videos"] for s in SPLITS} == {"train": 12, "val": 4, "test": 4}
    assert leftovers(out) == []


@pytest.mark.slow
def test_a_write_that_fails_partway_publishes_nothing(ray_session, tmp_path):
    """Bad row in the last of several files: the run fails after other files' shards were
    written; nothing sits at the output's name, and no staging folder is left."""
    from pipeline.data.synthetic import generate_pairs

    pairs = generate_pairs(600, seed=2)
    for i in range(3):
        lines = [json.dumps({"en": s, "de": t}) for s, t in pairs[i * 200 : (i + 1) * 200]]
        if i == 2:
            lines[-1] = "{broken"
        (tmp_path / f"p{i}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(
        [
            "data=table",
            f"data.files={tmp_path}/p*.jsonl",
            "data.src_column=en",
            "data.tgt_column=de",
            f"data.output_dir={tmp_path}/out",
            "data.vocab_size=300",
            "data.val_fraction=0.1",
            "data.test_fraction=0.1",
        ]
    ).data
    with pytest.raises(DataError, match=r"p2\.jsonl:200: malformed JSON"):
        preprocess(cfg)
    from pipeline.data.preprocess import _fingerprint
    from pipeline.data.readers import list_tasks

    out = output_dir(cfg, _fingerprint(list_tasks(cfg)))
    assert not Path(out).exists() and leftovers(out) == []


def _cli(*args):
    return [sys.executable, "-m", "pipeline.cli", "preprocess", *args]


@pytest.mark.slow
def test_killed_preprocess_is_never_reused_and_the_rerun_counts_right(ray_session, tmp_path):
    """SIGKILL `pipeline preprocess` as soon as its first shard is on disk; the same command
    again builds a complete output with one copy of each row."""
    root = tmp_path / "corpus"
    write_demo_video(str(root), n_train=80, n_val=10, n_test=10, seed=4, size=64, num_frames=16)
    args = _cli(
        "data=demo_video",
        f"data.root={root}",
        f"data.output_dir={tmp_path}/out",
        "data.feature_cache=",
        "data.num_frames=4",
        "data.frame_size=32",
    )
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    try:
        while not list((tmp_path / "out").glob("**/*.parquet")):
            assert proc.poll() is None, "preprocess ended before it could be interrupted"
            assert time.time() < deadline, "no shard written within 180 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    outs = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and ".staging-" not in p.name]
    assert all(read_manifest(str(p)) is None for p in outs)  # nothing a rerun would reuse
    time.sleep(2)  # the killed job's tasks are cancelled by Ray
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{\n") :])
    out = summary["output"]
    assert shard_rows(out) == {"train": 80, "val": 10, "test": 10}
    assert {s: summary["splits"][s]["videos"] for s in SPLITS} == shard_rows(out)
    assert leftovers(out) == []


@pytest.mark.slow
def test_two_preprocess_processes_one_builds_the_other_reuses(ray_session, tmp_path):
    args = _cli(
        "data=demo_text",
        f"data.root={tmp_path}/demo",
        "data.demo_size=3000",
        "data.vocab_size=300",
        f"data.output_dir={tmp_path}/out",
    )
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    built = [o for o in outputs if "[preprocess] built " in o]
    reused = [o for o in outputs if "[preprocess] reusing " in o]
    assert len(built) == 1 and len(reused) == 1, outputs
    assert "[preprocess] waiting for " in reused[0]  # it waited for the builder, then reused
    summary = json.loads(built[0][built[0].index("{\n") :])
    assert shard_rows(summary["output"]) == {s: summary["splits"][s]["kept"] for s in SPLITS}
    assert (tmp_path / "demo" / DEMO_MARKER).exists()  # generated once, by one of them
    assert leftovers(summary["output"]) == []


# ---------------------------------------------------------------- demo folders


def test_demo_generators_write_only_into_folders_they_own(tmp_path):
    user = tmp_path / "mine"
    (user / "videos").mkdir(parents=True)
    (user / "videos" / "video0.mp4").write_bytes(b"my own clip")
    # A folder holding a user's clips (and no annotation file): refused, the clip untouched.
    with pytest.raises(DataError, match=rf"{user} is not empty \(videos\) and was not made by the demo generator"):
        ensure_demo_video(video_cfg(user, tmp_path))
    # data.captions_file set (a user's corpus): refused even in an empty folder.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not generating a demo corpus into .*empty: data.captions_file is set"):
        ensure_demo_video(video_cfg(tmp_path / "empty", tmp_path, f"data.captions_file={tmp_path}/caps.json"))
    assert (user / "videos" / "video0.mp4").read_bytes() == b"my own clip"
    assert list((tmp_path / "empty").iterdir()) == []
    # Text: a folder with other files is refused too.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("mine")
    with pytest.raises(DataError, match=r"notes is not empty \(thesis.tex\)"):
        ensure_demo_corpus(load_config(["data=demo_text", f"data.root={tmp_path}/notes", "data.demo_size=300"]).data)
    # A folder the generator made and did not finish (marker, not complete) is its own: regenerated.
    half = tmp_path / "half"
    half.mkdir()
    (half / DEMO_MARKER).write_text(json.dumps({"complete": False}))
    (half / "train.en.gz").write_bytes(b"cut")
    cfg = load_config(["data=demo_text", f"data.root={half}", "data.demo_size=300"]).data
    ensure_demo_corpus(cfg)
    assert json.loads((half / DEMO_MARKER).read_text())["complete"] is True
    assert len(list(half.glob("*.gz"))) == 6
    before = (half / "train.en.gz").stat().st_mtime_ns
    ensure_demo_corpus(cfg)  # complete: left alone
    assert (half / "train.en.gz").stat().st_mtime_ns == before


def test_a_demo_corpus_made_with_other_settings_is_generated_again(tmp_path, capsys):
    """A demo folder generated for data.demo_size=300 is not reused by a run asking for 700
    (it was: the bench then trained on 300 pairs, 4 steps an epoch); the same size again is."""
    import gzip

    root = tmp_path / "demo"

    def pairs() -> int:
        with gzip.open(root / "train.en.gz", "rt") as f:
            return sum(1 for _ in f)

    def ensure(size: int) -> None:
        ensure_demo_corpus(load_config(["data=demo_text", f"data.root={root}", f"data.demo_size={size}"]).data)

    ensure(300)
    assert pairs() == 300
    before = (root / "train.en.gz").stat().st_mtime_ns
    ensure(300)
    assert (root / "train.en.gz").stat().st_mtime_ns == before  # the same settings: reused
    capsys.readouterr()
    ensure(700)
    assert pairs() == 700
    assert (
        "holds another data=demo_text corpus (train_pairs 300 -> 700): generating it again" in capsys.readouterr().out
    )
    # A marker from before the generator recorded its settings: its corpus is generated again too.
    (root / DEMO_MARKER).write_text(json.dumps({"generator": "data=demo_text", "complete": True}))
    ensure(700)
    assert "made before the generator recorded its settings" in capsys.readouterr().out
    assert json.loads((root / DEMO_MARKER).read_text())["params"]["train_pairs"] == 700
    # Files in the demo layout without a marker are a user's: left as they are, whatever the size.
    (root / DEMO_MARKER).unlink()
    ensure(300)
    assert pairs() == 700 and not (root / DEMO_MARKER).exists()
