"""Tests for the synthetic demo video corpus: layouts, real decodable mp4s, captions that say
what the clip shows, and motion that only the order of frames reveals."""

import io
import itertools
import json
import re
from collections import Counter

import av
import numpy as np
import pytest

from pipeline.data.synthetic_video import (
    ATTRIBUTE_WORDS,
    COLOURS,
    DIRECTIONS,
    NOISE,
    SHAPES,
    SIZES,
    TEMPLATES,
    caption_vocabulary,
    clip_specs,
    encode_mp4,
    parse_caption,
    render_clip,
    video_codec,
    write_demo_video,
)

SIZE, FRAMES, FPS = 64, 16, 8
COUNTS = {"train": 8, "validate": 2, "test": 2}


def _write(root, layout="msrvtt", seed=3, **kw):
    return write_demo_video(str(root), 8, 2, 2, seed=seed, layout=layout, size=SIZE, num_frames=FRAMES, fps=FPS, **kw)


def _decode(source) -> np.ndarray:
    """All frames of an mp4 (a path or its bytes) as (T, H, W, 3) RGB."""
    source = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    with av.open(source) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    root = tmp_path_factory.mktemp("msrvtt") / "nested" / "demo"  # parents must be created
    summary = _write(root)
    return root, summary, json.loads((root / "train_val_videodatainfo.json").read_text())


@pytest.fixture(scope="module")
def captions_by_video(msrvtt):
    out: dict[str, list[str]] = {}
    for s in msrvtt[2]["sentences"]:
        out.setdefault(s["video_id"], []).append(s["caption"])
    return out


def test_msrvtt_layout_and_schema(msrvtt):
    root, summary, doc = msrvtt
    assert set(doc) == {"info", "videos", "sentences"}
    assert summary["annotations"] == str(root / "train_val_videodatainfo.json")
    assert summary["clips"] == 12 and summary["captions"] == 60
    assert summary["codec"] == video_codec()
    videos = doc["videos"]
    assert Counter(v["split"] for v in videos) == COUNTS
    assert [v["id"] for v in videos] == list(range(12))
    for v in videos:
        assert set(v) == {"video_id", "split", "id", "url", "start time", "end time", "category"}
        assert v["end time"] == pytest.approx(FRAMES / FPS) and v["start time"] == 0.0
        assert (root / "videos" / f"{v['video_id']}.mp4").is_file()
    ids = {v["video_id"] for v in videos}
    assert len(ids) == 12
    sentences = doc["sentences"]
    assert len({s["sen_id"] for s in sentences}) == len(sentences) == 60
    assert all(s["video_id"] in ids for s in sentences)
    assert Counter(s["video_id"] for s in sentences) == dict.fromkeys(ids, 5)
    assert sorted(p.name for p in (root / "videos").iterdir()) == sorted(f"{i}.mp4" for i in ids)


def test_same_seed_same_corpus_other_seed_differs(msrvtt, tmp_path):
    root = msrvtt[0]
    _write(tmp_path / "again")
    _write(tmp_path / "other", seed=4)
    name = "train_val_videodatainfo.json"
    assert (tmp_path / "again" / name).read_bytes() == (root / name).read_bytes()
    assert (tmp_path / "other" / name).read_bytes() != (root / name).read_bytes()
    for clip in ("video0", "video11"):
        a, b = (_decode(r / "videos" / f"{clip}.mp4") for r in (root, tmp_path / "again"))
        assert np.array_equal(a, b)


def test_clips_decode_with_the_right_frames(msrvtt):
    for path in sorted((msrvtt[0] / "videos").iterdir()):
        frames = _decode(path)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3), path.name
    with av.open(str(msrvtt[0] / "videos" / "video0.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == ("h264" if video_codec() == "libx264" else "mpeg4")
        assert stream.codec_context.format.name == "yuv420p"
        assert stream.average_rate == FPS


def test_every_caption_names_the_same_four_attributes(captions_by_video):
    for _vid, caps in captions_by_video.items():
        parsed = [parse_caption(c) for c in caps]
        assert all(set(p) == {"size", "colour", "shape", "direction"} for p in parsed), caps
        assert all(p == parsed[0] for p in parsed), caps
        assert all(c == c.lower() and re.fullmatch(r"[a-z ]+", c) for c in caps)


def _template_of(caption: str) -> str:
    def slot(attr):
        phrases = {p for ps in ATTRIBUTE_WORDS[attr].values() for p in ps}
        phrases = sorted(phrases, key=len, reverse=True)  # longest first: "to the left"
        return "(?:" + "|".join(map(re.escape, phrases)) + ")"

    matches = [
        t
        for t in TEMPLATES
        if re.fullmatch(re.sub(r"\\\{(\w+)\\\}", lambda m: slot(m.group(1)), re.escape(t)), caption)
    ]
    assert len(matches) == 1, (caption, matches)
    return matches[0]


def test_captions_of_a_clip_are_paraphrases_from_distinct_templates(captions_by_video):
    for caps in captions_by_video.values():
        assert len({_template_of(c) for c in caps}) == len(caps) == 5
    assert len(caption_vocabulary()) < 80
    words = {w for caps in captions_by_video.values() for c in caps for w in c.split()}
    assert words <= caption_vocabulary()


def test_object_moves_the_way_the_captions_say(msrvtt, captions_by_video):
    for vid, caps in captions_by_video.items():
        attrs = parse_caption(caps[0])
        frames = _decode(msrvtt[0] / "videos" / f"{vid}.mp4").astype(np.float64)
        close = np.linalg.norm(frames - np.array(COLOURS[attrs["colour"]]), axis=-1) < 60
        assert close.sum(axis=(1, 2)).min() >= 20, vid  # the object is visible in every frame
        ys, xs = np.mgrid[0:SIZE, 0:SIZE]
        centroid = np.stack([(close * xs).sum((1, 2)), (close * ys).sum((1, 2))], 1)
        centroid = centroid / close.sum((1, 2))[:, None]
        dx, dy = centroid[-3:].mean(0) - centroid[:3].mean(0)
        ux, uy = DIRECTIONS[attrs["direction"]]
        along, across = (dx, dy) if ux else (dy, dx)
        assert along * (ux + uy) > 0.15 * SIZE, (vid, attrs, dx, dy)
        assert abs(across) < 2, (vid, attrs, dx, dy)
        steps = np.diff(centroid[:, 0] if ux else centroid[:, 1]) * (ux + uy)
        assert (steps > -0.5).all(), (vid, steps)  # monotone: constant speed, no jumps back


@pytest.mark.parametrize("pair", [("left", "right"), ("up", "down")])
@pytest.mark.parametrize(
    "shape,colour,size,seed",
    [
        ("circle", "red", "small", 0),
        ("triangle", "white", "large", 1),
        ("square", "purple", "large", 2),
        ("diamond", "green", "small", 3),
    ],
)
def test_mean_frame_does_not_reveal_direction(pair, shape, colour, size, seed):
    a, b = (render_clip(shape, colour, size, d, frame_size=SIZE, num_frames=FRAMES, seed=seed) for d in pair)
    assert a.shape == (FRAMES, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b).max() > 100  # the clips themselves differ...
    mean_a, mean_b = a.mean(0), b.mean(0)
    assert np.abs(mean_a - mean_b).max() < 1e-9  # ...but their time-averages do not
    # The encoded clips stay close too: what differs is codec noise, not the direction.
    dec_a, dec_b = (_decode(encode_mp4(x, FPS)).mean(0) for x in (a, b))
    assert np.abs(dec_a - dec_b).mean() < 2.0  # a 3-pixel shift of the path gives ~7.5


def test_render_is_deterministic_and_mpeg4_fallback_decodes():
    a = render_clip("diamond", "blue", "large", "up", frame_size=SIZE, num_frames=FRAMES, seed=9)
    assert np.array_equal(a, render_clip("diamond", "blue", "large", "up", frame_size=SIZE, num_frames=FRAMES, seed=9))
    decoded = _decode(encode_mp4(a, FPS, codec="mpeg4"))
    assert decoded.shape == a.shape
    assert np.abs(decoded.astype(int) - a).mean() < 8


def test_attributes_are_balanced_and_every_combination_appears():
    everything = len(SHAPES) * len(COLOURS) * len(SIZES) * len(DIRECTIONS)
    for n in (12, 48, everything):
        specs = clip_specs(n, 0, 0, seed=5)
        for attr in ("shape", "colour", "size", "direction"):
            counts = Counter(getattr(s, attr) for s in specs)
            assert max(counts.values()) - min(counts.values()) <= 2, (n, attr, counts)
    combos = Counter((s.shape, s.colour, s.size, s.direction) for s in clip_specs(everything, 0, 0, seed=5))
    assert set(combos) == set(itertools.product(SHAPES, COLOURS, SIZES, DIRECTIONS))
    assert set(combos.values()) == {1}


def test_msvd_layout(tmp_path):
    summary = _write(tmp_path, layout="msvd")
    assert summary["annotations"] == str(tmp_path / "captions.txt")
    lines = (tmp_path / "captions.txt").read_text().splitlines()
    assert len(lines) == 60
    ids = [line.split(" ", 1)[0] for line in lines]
    assert all(len(line.split(" ", 1)) == 2 and line.split(" ", 1)[1] for line in lines)
    assert all((tmp_path / "videos" / f"{i}.mp4").is_file() for i in ids)
    lists = {name: (tmp_path / f"{name}.txt").read_text().split() for name in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [8, 2, 2]
    listed = [i for v in lists.values() for i in v]
    assert sorted(listed) == sorted(set(ids)) and len(listed) == len(set(listed))
    assert all(len(set(parse_caption(line.split(" ", 1)[1]))) == 4 for line in lines)

    _write(tmp_path / "nolists", layout="msvd", split_lists=False)
    assert not any((tmp_path / "nolists" / f"{n}.txt").exists() for n in ("train", "val", "test"))
    assert (tmp_path / "nolists" / "captions.txt").read_text() == "\n".join(lines) + "\n"


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_demo_video(str(tmp_path), 1, 1, 1, layout="coco")
    with pytest.raises(ValueError, match="even"):
        write_demo_video(str(tmp_path), 1, 1, 1, size=65)
    with pytest.raises(ValueError, match="direction"):
        render_clip("circle", "red", "small", "sideways")


# The second generator (style "noise"): other shapes, colours, sizes, words, templates, frame
# counts and sizes, on fresh noise every frame; for checking what carries beyond the demo.
N_SIZE, N_FRAMES = 48, 12


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    summary = write_demo_video(str(root), 10, 3, 3, seed=7, size=N_SIZE, num_frames=N_FRAMES, fps=6, style="noise")
    doc = json.loads((root / "train_val_videodatainfo.json").read_text())
    caps: dict[str, list[str]] = {}
    for s in doc["sentences"]:
        caps.setdefault(s["video_id"], []).append(s["caption"])
    return root, summary, doc, caps


def test_noise_style_captions_name_its_own_attributes(noise):
    root, summary, doc, caps = noise
    assert summary["clips"] == 16 and summary["captions"] == 80
    assert "(noise)" in doc["info"]["generator"] and "style noise" in (root / "README.md").read_text()
    for cs in caps.values():
        parsed = [parse_caption(c, "noise") for c in cs]
        assert all(set(p) == {"size", "colour", "shape", "direction"} for p in parsed), cs
        assert all(p == parsed[0] for p in parsed), cs
        assert parsed[0]["shape"] in NOISE.shapes and parsed[0]["size"] in NOISE.sizes
    words = {w for cs in caps.values() for c in cs for w in c.split()}
    assert words <= caption_vocabulary("noise")
    # A vocabulary of its own: most of its words are not the demo's.
    assert len(caption_vocabulary("noise") - caption_vocabulary()) >= 20
    assert len(NOISE.templates) != len(TEMPLATES) and not set(NOISE.templates) & set(TEMPLATES)


def test_noise_style_background_changes_every_frame_and_the_object_moves(noise):
    root, _, _, caps = noise
    for vid, cs in caps.items():
        attrs = parse_caption(cs[0], "noise")
        frames = _decode(root / "videos" / f"{vid}.mp4").astype(np.float64)
        assert frames.shape == (N_FRAMES, N_SIZE, N_SIZE, 3)
        close = np.linalg.norm(frames - np.array(NOISE.colours[attrs["colour"]]), axis=-1) < 60
        assert close.sum(axis=(1, 2)).min() >= 6, vid  # the object is visible in every frame
        ys, xs = np.mgrid[0:N_SIZE, 0:N_SIZE]
        centroid = np.stack([(close * xs).sum((1, 2)), (close * ys).sum((1, 2))], 1) / close.sum((1, 2))[:, None]
        dx, dy = centroid[-2:].mean(0) - centroid[:2].mean(0)
        ux, uy = DIRECTIONS[attrs["direction"]]
        along, across = (dx, dy) if ux else (dy, dx)
        assert along * (ux + uy) > 0.15 * N_SIZE and abs(across) < 3, (vid, attrs, dx, dy)
    # Far from the object, consecutive frames differ (fresh noise); the demo's background does not.
    still = render_clip("ring", "cyan", "small", "up", frame_size=N_SIZE, num_frames=4, seed=1, style="noise")
    corner = still[:, :4, :4].astype(int)
    assert np.abs(np.diff(corner, axis=0)).mean() > 10
    demo = render_clip("circle", "red", "small", "up", frame_size=N_SIZE, num_frames=4, seed=1).astype(int)
    assert np.abs(np.diff(demo[:, :4, :4], axis=0)).max() == 0


def test_noise_style_is_balanced_deterministic_and_checks_its_values():
    everything = len(NOISE.shapes) * len(NOISE.colours) * len(NOISE.sizes) * len(DIRECTIONS)
    specs = clip_specs(everything, 0, 0, seed=5, style="noise")
    assert {(s.shape, s.colour, s.size, s.direction) for s in specs} == set(itertools.product(*NOISE.values))
    assert specs == clip_specs(everything, 0, 0, seed=5, style="noise")
    assert [s.shape for s in specs[:20]] != [s.shape for s in clip_specs(20, 0, 0, seed=5)]
    a = render_clip("cross", "orange", "medium", "left", frame_size=N_SIZE, num_frames=N_FRAMES, seed=3, style=NOISE)
    b = render_clip("cross", "orange", "medium", "left", frame_size=N_SIZE, num_frames=N_FRAMES, seed=3, style="noise")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="style noise"):
        render_clip("diamond", "red", "small", "up", style="noise")  # a demo shape
    with pytest.raises(ValueError, match="style must be one of demo, noise"):
        write_demo_video("unused", 1, 1, 1, style="fog")
