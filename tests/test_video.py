"""Video-caption data on a real local Ray cluster: PyAV decoding of real mp4 files, the
MSR-VTT, MSVD and precomputed-feature readers, the feature cache, bad clips both ways."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.readers import DataError
from pipeline.data.synthetic_video import encode_mp4, render_clip, write_demo_video
from pipeline.data.video import clip_array, decode_clip, sample_indices
from pipeline.models import build_model
from pipeline.tasks import preprocess


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    root = tmp_path_factory.mktemp("msrvtt")
    write_demo_video(str(root), n_train=16, n_val=6, n_test=6, seed=3, size=64, num_frames=16)
    return root


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


def fresh_copy(src, tmp):
    dest = tmp / "corpus"
    shutil.copytree(src, dest)
    return dest


def test_decode_samples_k_frames_from_real_mp4():
    frames = render_clip("circle", "red", "large", "right", frame_size=64, num_frames=20, seed=1)
    data = encode_mp4(frames, fps=10)
    clip = decode_clip(data, num_frames=5, frame_size=32)
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
    # The sampled frames keep the motion: the red mass moves right.
    red = (clip[..., 0].astype(int) - clip[..., 1]) > 80
    xs = [np.nonzero(f)[1].mean() for f in red]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 5
    # fps sampling: one frame every 1/fps seconds from the start, at most K.
    assert decode_clip(data, num_frames=50, frame_size=16, fps=5.0).shape[0] == 10  # 2 s clip at 5 fps
    assert list(sample_indices(3, 6)) == [0, 0, 1, 1, 2, 2]  # a short clip repeats frames


@pytest.mark.parametrize("data,msg", [(b"", "empty file"), (b"\x00\x01 not a video" * 50, "cannot decode video")])
def test_decode_bad_bytes_names_the_file(data, msg):
    with pytest.raises(DataError, match=f"clip7.mp4: {msg}"):
        decode_clip(data, 4, 32, name="clip7.mp4")


@pytest.mark.slow
def test_msrvtt_preprocess_counts_every_caption_and_reuses_the_cache(ray_session, msrvtt, tmp_path):
    cfg = video_cfg(msrvtt, tmp_path)
    out, m = preprocess(cfg)
    ann = json.loads((msrvtt / "train_val_videodatainfo.json").read_text())
    assert m["rows_read"] == len(ann["sentences"]) == m["rows_kept"] + sum(m["dropped"].values())
    assert m["videos"]["read"] == len(ann["videos"]) == 28 and m["videos"]["kept"] == 28
    assert {s: m["splits"][s]["videos"] for s in ("train", "val", "test")} == {"train": 16, "val": 6, "test": 6}
    assert m["video"]["kind"] == "frames" and m["video"]["shape"] == [4, 32, 32, 3]
    assert m["cache"] == {"hits": 0, "misses": 28, "dir": cfg.feature_cache}
    rows = pq.read_table(f"{out}/val").to_pylist()
    by_video = {}
    for s in ann["sentences"]:
        by_video.setdefault(s["video_id"], []).append(s["caption"])
    for r in rows:  # every reference of a video stays with it, in order
        assert r["captions"] == by_video[r["video_id"]] and len(r["caption_ids"]) == len(r["captions"])
        assert clip_array(r["data"], r["shape"], r["dtype"]).shape == (4, 32, 32, 3)
    # Another output (a different caption filter) over the same clips: decoded frames come from the cache.
    _, m2 = preprocess(video_cfg(msrvtt, tmp_path, "data.max_chars=500"))
    assert m2["cache"]["hits"] == 28 and m2["cache"]["misses"] == 0


@pytest.mark.slow
def test_corrupt_clip_fails_by_default_and_is_counted_when_skipped(ray_session, msrvtt, tmp_path):
    root = fresh_copy(msrvtt, tmp_path)
    (root / "videos" / "video3.mp4").write_bytes(b"garbage" * 100)
    (root / "videos" / "video20.mp4").write_bytes(b"")
    with pytest.raises(Exception, match=r"video(3|20)\.mp4"):
        preprocess(video_cfg(root, tmp_path))
    out, m = preprocess(video_cfg(root, tmp_path, "data.on_bad_rows=skip"))
    assert m["videos"]["dropped"] == {"bad_video": 2} and m["videos"]["kept"] == 26
    assert m["dropped"] == {"bad_video": 10}  # their 5 captions each
    assert m["rows_read"] == m["rows_kept"] + 10
    assert any("video3.mp4" in e for e in m["videos"]["errors"]) and any(
        "empty file" in e for e in m["videos"]["errors"]
    )
    assert "video3" not in {r["video_id"] for r in pq.read_table(f"{out}/train").to_pylist()}


@pytest.mark.slow
def test_msrvtt_annotation_errors_name_the_problem(ray_session, msrvtt, tmp_path):
    root = fresh_copy(msrvtt, tmp_path)
    ann_path = root / "train_val_videodatainfo.json"
    ann = json.loads(ann_path.read_text())
    broken = dict(ann, videos=[dict(ann["videos"][0])] + ann["videos"][1:])
    del broken["videos"][0]["split"]
    ann_path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"videos\[0\] has no 'split' field"):
        preprocess(video_cfg(root, tmp_path))
    ann["sentences"].append({"video_id": "video999", "caption": "a ghost", "sen_id": 10**6})
    ann_path.write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"sentences\[\d+\]: caption for video 'video999', which is not listed"):
        preprocess(video_cfg(root, tmp_path))
    _, m = preprocess(video_cfg(root, tmp_path, "data.on_bad_rows=skip"))
    assert m["dropped"] == {"caption_unknown_video": 1} and m["rows_read"] == m["rows_kept"] + 1
    (root / "videos" / "video5.mp4").unlink()  # listed, captioned, but no clip
    with pytest.raises(DataError, match="have no clip or feature file, e.g. 'video5'"):
        preprocess(video_cfg(root, tmp_path))


@pytest.mark.slow
def test_msvd_layout_with_and_without_split_lists(ray_session, tmp_path):
    root = tmp_path / "msvd"
    write_demo_video(str(root), n_train=10, n_val=4, n_test=4, seed=5, layout="msvd", size=64, num_frames=12)
    base = [
        "data=msvd",
        f"data.root={root}",
        f"data.output_dir={tmp_path}/out",
        f"data.feature_cache={tmp_path}/c",
        "data.num_frames=4",
        "data.frame_size=32",
        "data.vocab_size=200",
    ]
    _, m = preprocess(load_config(base).data)
    assert {s: m["splits"][s]["videos"] for s in ("train", "val", "test")} == {"train": 10, "val": 4, "test": 4}
    lines = (root / "captions.txt").read_text().splitlines()
    assert m["rows_read"] == len(lines) == m["rows_kept"]
    for name in ("train", "val", "test"):
        (root / f"{name}.txt").unlink()
    _, m2 = preprocess(load_config(base + ["data.val_fraction=0.3", "data.test_fraction=0.3"]).data)
    assert sum(m2["splits"][s]["videos"] for s in ("train", "val", "test")) == 18 and m2["splits"]["val"]["videos"] > 0
    (root / "captions.txt").write_text("\n".join(lines + ["lonely"]) + "\n")
    with pytest.raises(DataError, match=rf"captions.txt:{len(lines) + 1}: expected 'video_id caption'"):
        preprocess(load_config(base).data)


@pytest.mark.slow
def test_precomputed_features_npy_and_parquet(ray_session, msrvtt, tmp_path):
    ann = json.loads((msrvtt / "train_val_videodatainfo.json").read_text())
    rng = np.random.default_rng(0)
    feats = {v["video_id"]: rng.normal(size=(int(rng.integers(3, 7)), 12)).astype(np.float32) for v in ann["videos"]}
    (tmp_path / "npy").mkdir()
    for vid, f in feats.items():
        np.save(tmp_path / "npy" / f"{vid}.npy", f)
    common = [
        "data=video_features",
        f"data.captions_file={msrvtt}/train_val_videodatainfo.json",
        f"data.output_dir={tmp_path}/out",
        "data.vocab_size=200",
    ]
    out, m = preprocess(load_config(common + [f"data.files={tmp_path}/npy/*.npy"]).data)
    assert m["video"]["kind"] == "features" and m["video"]["feature_dim"] == 12 and m["videos"]["kept"] == 28
    row = pq.read_table(f"{out}/train").to_pylist()[0]
    np.testing.assert_allclose(
        clip_array(row["data"], row["shape"], row["dtype"]), feats[row["video_id"]].astype(np.float16)
    )
    table = pa.table({"video_id": list(feats), "features": [f.tolist() for f in feats.values()]})
    pq.write_table(table, tmp_path / "feats.parquet")
    _, m2 = preprocess(load_config(common + [f"data.files={tmp_path}/feats.parquet"]).data)
    assert m2["videos"]["kept"] == 28 and m2["rows_kept"] == m["rows_kept"]
    bad = pa.table({"vid": ["x"], "features": [[[1.0]]]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(Exception, match="bad.parquet: feature Parquet needs columns video_id and features"):
        preprocess(load_config(common + [f"data.files={tmp_path}/bad.parquet"]).data)


@pytest.mark.slow
def test_frozen_backbone_features_on_actor_pool_are_cached(ray_session, msrvtt, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3))
    torch.jit.script(net).save(str(tmp_path / "backbone.ts"))
    extra = ["data.frame_encoder=frozen", f"data.backbone={tmp_path}/backbone.ts"]
    out, m = preprocess(video_cfg(msrvtt, tmp_path, *extra))
    assert m["video"]["kind"] == "features" and m["video"]["shape"] == [4, 16] and m["cache"]["misses"] == 28
    _, m2 = preprocess(video_cfg(msrvtt, tmp_path, *extra, "data.max_chars=400"))
    assert m2["cache"]["hits"] == 28
    row = pq.read_table(f"{out}/test").to_pylist()[0]
    frames = decode_clip((msrvtt / "videos" / f"{row['video_id']}.mp4").read_bytes(), 4, 32)
    x = torch.from_numpy((frames.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    want = net(x.float().permute(0, 3, 1, 2)).mean(dim=(2, 3)).detach().numpy()
    np.testing.assert_allclose(
        clip_array(row["data"], row["shape"], row["dtype"]).astype(np.float32), want, rtol=2e-2, atol=2e-3
    )


def test_captioner_model_takes_frames_or_features():
    cfg = load_config(["model=small"]).model
    frames = torch.randint(0, 255, (3, 4, 32, 32, 3), dtype=torch.uint8)
    lens = torch.tensor([4, 4, 4])
    tgt = torch.randint(4, 50, (3, 6))
    m = build_model(model_cfg=cfg, src_vocab_size=50, tgt_vocab_size=50, joint_vocab=True, video={"kind": "frames"})
    loss, n = m(frames, lens, tgt, tgt)
    loss.backward()
    assert n == 18 and all(p.grad is not None for p in m.encoder.embedding.cnn.parameters())
    m.eval()  # dropout and batch statistics off: decoding is deterministic
    assert len(m.greedy(frames, lens, 5)) == 3 and m.beam_search(frames, lens, 5, 1) == m.greedy(frames, lens, 5)
    f = build_model(
        model_cfg=cfg,
        src_vocab_size=50,
        tgt_vocab_size=50,
        joint_vocab=True,
        video={"kind": "features", "feature_dim": 12},
    )
    feats = torch.randn(2, 5, 12)
    assert f(feats, torch.tensor([5, 3]), tgt[:2], tgt[:2])[1] == 12
    # Padding frames beyond a clip's length does not change its encoding (packed LSTM).
    f.eval()
    padded = torch.cat([feats[1:, :3], torch.randn(1, 2, 12)], dim=1)
    a, _, _ = f.encode(feats[1:, :3], torch.tensor([3]))
    b, _, _ = f.encode(padded, torch.tensor([3]))
    assert torch.allclose(a, b[:, :3], atol=1e-6)


# ---------------------------------------------------------------- rows never altered or dropped without a count


def faststart_mp4(path, num_frames=40):
    """An mp4 with its index (moov) first, as streaming sites write them: cut short, it still
    opens and says how many frames it should have."""
    import av

    from pipeline.data.synthetic_video import video_codec

    frames = render_clip("circle", "red", "large", "right", frame_size=64, num_frames=num_frames, seed=1)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream(video_codec(), rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path.read_bytes()


@pytest.mark.parametrize("fps", [0.0, 5.0])
def test_truncated_clip_is_an_error_not_its_first_frames(tmp_path, fps):
    """Before: the 12 frames decoded before the cut were kept as if they were the clip."""
    from pipeline.data.video import TruncatedClip

    data = faststart_mp4(tmp_path / "full.mp4")
    k = 20 if fps else 4  # at 5 fps, 20 samples reach to 3.8 s of the 4 s clip
    assert decode_clip(data, k, 32, fps=fps).shape == (k, 32, 32, 3)
    with pytest.raises(TruncatedClip, match=r"cut\.mp4: truncated: \d+ of 40 frames decoded"):
        decode_clip(data[: int(len(data) * 0.8)], k, 32, fps=fps, name="cut.mp4")


def _msrvtt_json(root):
    return root / "train_val_videodatainfo.json"


def _dup_clip(root):
    (root / "videos" / "more").mkdir()
    shutil.copy(root / "videos" / "video1.mp4", root / "videos" / "more" / "video1.mp4")


def _conflicting_split(root):
    ann = json.loads(_msrvtt_json(root).read_text())
    ann["videos"].append(dict(ann["videos"][2], split="test" if ann["videos"][2]["split"] != "test" else "train"))
    _msrvtt_json(root).write_text(json.dumps(ann))


def _too_many_captions(root):
    ann = json.loads(_msrvtt_json(root).read_text())
    ann["sentences"] += [
        {"video_id": "video0", "caption": f"a red thing {i}", "sen_id": 10**6 + i} for i in range(1025)
    ]
    _msrvtt_json(root).write_text(json.dumps(ann))


def _msvd_conflict(root):
    test_ids = (root / "test.txt").read_text().split()
    train_ids = (root / "train.txt").read_text().split()
    (root / "test.txt").write_text("\n".join(test_ids + [train_ids[0]]) + "\n")


CASES = {  # name: (layout, mutation, error, videos dropped with skip, captions dropped with skip)
    "duplicate_video": (
        "msrvtt",
        _dup_clip,
        r"video id 'video1' has 2 clips or feature rows: .*more/video1\.mp4",
        {"duplicate_video": 1},
        {},
    ),
    "conflicting_split": (
        "msrvtt",
        _conflicting_split,
        r"train_val_videodatainfo\.json: videos\[28\]: video 'video2' is listed in split",
        {"conflicting_split": 1},
        {"conflicting_split": 5},
    ),
    "conflicting_split_msvd": (
        "msvd",
        _msvd_conflict,
        r"test\.txt:5: video '\w+' is also listed in .*train\.txt:1",
        {"conflicting_split": 1},
        {"conflicting_split": 5},
    ),
    "too_many_captions": (
        "msrvtt",
        _too_many_captions,
        r"sentences\[\d+\]: video 'video0' has more than 1024 captions",
        {},
        {"too_many_captions": 6},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_listing_problems_are_named_or_counted(msrvtt, tmp_path, case):
    """Before: the first clip, the first split, every caption were taken silently."""
    from pipeline.data.video import list_corpus

    layout, mutate, error, vdropped, cdropped = CASES[case]
    if layout == "msvd":
        root = tmp_path / "corpus"
        write_demo_video(str(root), n_train=8, n_val=4, n_test=4, seed=5, layout="msvd", size=64, num_frames=12)
    else:
        root = fresh_copy(msrvtt, tmp_path)
    mutate(root)
    name = ["data.name=msvd", "data.val_split=val"] if layout == "msvd" else ["data.name=msrvtt"]
    with pytest.raises(DataError, match=error):
        list_corpus(video_cfg(root, tmp_path, *name))
    c = list_corpus(video_cfg(root, tmp_path, *name, "data.on_bad_rows=skip"))
    assert c["videos_dropped"] == vdropped and c["dropped"] == cdropped
    assert c["captions_read"] == sum(map(len, c["captions"].values())) + sum(c["dropped"].values())


def test_duplicate_feature_rows_are_named_or_counted(msrvtt, tmp_path):
    from pipeline.data.video import list_corpus

    ann = json.loads(_msrvtt_json(msrvtt).read_text())
    vids = [v["video_id"] for v in ann["videos"]]

    def feats(ids):
        return pa.table({"video_id": ids, "features": [[[0.5] * 4] * 3 for _ in ids]})

    pq.write_table(feats(vids[:20]), tmp_path / "a.parquet")
    pq.write_table(feats(vids[18:]), tmp_path / "b.parquet")  # video18, video19 twice
    common = [
        "data=video_features",
        f"data.captions_file={_msrvtt_json(msrvtt)}",
        f"data.files={tmp_path}/*.parquet",
        f"data.output_dir={tmp_path}/out",
    ]
    with pytest.raises(
        DataError, match=r"video id 'video18' has 2 clips or feature rows: .*a\.parquet#18, .*b\.parquet#0"
    ):
        list_corpus(load_config(common).data)
    c = list_corpus(load_config(common + ["data.on_bad_rows=skip"]).data)
    assert c["videos_dropped"] == {"duplicate_video": 2} and c["source_rows"]["video19"].endswith("a.parquet#19")


@pytest.mark.slow
def test_skipped_problems_add_up_end_to_end_and_a_bad_cache_entry_is_recomputed(ray_session, msrvtt, tmp_path):
    root = fresh_copy(msrvtt, tmp_path)
    _dup_clip(root)
    _conflicting_split(root)
    _too_many_captions(root)
    data = faststart_mp4(tmp_path / "full.mp4")
    (root / "videos" / "video4.mp4").write_bytes(data[: int(len(data) * 0.8)])
    out, m = preprocess(video_cfg(root, tmp_path, "data.on_bad_rows=skip"))
    assert m["videos"]["dropped"] == {"duplicate_video": 1, "conflicting_split": 1, "truncated_video": 1}
    assert m["videos"]["read"] == 29 == m["videos"]["kept"] + 3
    assert m["dropped"] == {"conflicting_split": 5, "too_many_captions": 6, "truncated_video": 5}
    assert m["rows_read"] == m["rows_kept"] + sum(m["dropped"].values())
    assert any("video4.mp4: truncated" in e for e in m["videos"]["errors"])
    rows = {s: pq.read_table(f"{out}/{s}").num_rows for s in ("train", "val", "test")}
    assert rows == {s: m["splits"][s]["videos"] for s in rows} and sum(rows.values()) == 26
    # A damaged cache entry: recomputed and counted, the clip kept.
    entries = sorted((tmp_path / "cache").glob("frames/*/*/*.parquet"))
    assert len(entries) == 26
    entries[0].write_bytes(b"not parquet")
    _, m2 = preprocess(video_cfg(root, tmp_path, "data.on_bad_rows=skip", "data.max_chars=500"))
    assert m2["cache"]["hits"] == 25 and m2["cache"]["errors"] == 1 and entries[0].name in m2["cache"]["error_files"][0]
    assert m2["videos"]["kept"] == 26
