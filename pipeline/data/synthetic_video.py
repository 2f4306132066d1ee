"""Synthetic video-caption corpus: the embedded default data for video captioning (demo video).

Each clip shows one object (shape, colour, size) crossing a plain, slightly textured background
in a straight line (left, right, up or down), written as a real H.264 mp4 so the normal video
loader decodes it unchanged. Every caption names all four attributes, so a perfect captioner
must read appearance from any frame *and* motion from the order of frames: the trajectory is
symmetric in time about a midpoint drawn independently of the direction, so the mean frame of a
clip moving left equals that of the same clip moving right. `write_demo_video` writes the
MSR-VTT layout (videos/ + train_val_videodatainfo.json) or the MSVD layout (videos/ +
captions.txt + split lists).

Two styles: ``DEMO`` (the embedded default: 4 shapes, 6 colours, 2 sizes on a static textured
background) and ``NOISE``, a second generator for checking that models and defaults carry to a
corpus they were not tuned on: 5 other shapes, 8 colours, 3 sizes, its own words and templates,
on a background of fresh noise in every frame.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import pathlib
import random
from collections import Counter
from dataclasses import dataclass

import av
import numpy as np

from pipeline.data.synthetic import _atomic_write, split_seed

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # RGB, well apart from each other and from the dark background, even after 4:2:0
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (235, 220, 40),
    "white": (240, 240, 240),
    "purple": (160, 50, 210),
}
SIZES = {"small": 0.08, "large": 0.18}  # object radius as a fraction of the frame side
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down

# Synonyms are drawn per caption; a direction phrase fits after any motion verb in TEMPLATES.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
DIRECTION_WORDS = {
    "left": ("left", "leftward", "to the left", "toward the left"),
    "right": ("right", "rightward", "to the right", "toward the right"),
    "up": ("up", "upward", "to the top", "toward the top"),
    "down": ("down", "downward", "to the bottom", "toward the bottom"),
}
TEMPLATES = (
    "a {size} {colour} {shape} moves {direction}",
    "a {size} {colour} {shape} is moving {direction}",
    "the {size} {colour} {shape} travels {direction}",
    "there is a {size} {colour} {shape} moving {direction}",
    "a {colour} {shape} that is {size} slides {direction}",
    "the {colour} {shape} is {size} and it goes {direction}",
    "we see a {size} {shape} in {colour} drifting {direction}",
    "a {size} {colour} {shape} heads {direction}",
)
ATTRIBUTE_WORDS = {"size": SIZE_WORDS, "colour": COLOUR_WORDS, "shape": SHAPE_WORDS, "direction": DIRECTION_WORDS}

# Convex shapes as half-planes (unit normal, apothem in radii). Apothems give every shape the
# area of the circle, so "small"/"large" means the same amount of colour whatever the shape.
_SQUARE_APOTHEM = math.sqrt(math.pi) / 2
_TRIANGLE_APOTHEM = math.sqrt(math.pi / (3 * math.sqrt(3)))
_S60, _C60, _R2 = math.sqrt(3) / 2, 0.5, math.sqrt(0.5)
_POLYGONS = {
    "square": (((1, 0), (-1, 0), (0, 1), (0, -1)), _SQUARE_APOTHEM),
    "diamond": (((_R2, _R2), (_R2, -_R2), (-_R2, _R2), (-_R2, -_R2)), _SQUARE_APOTHEM),
    "triangle": (((0, 1), (_S60, -_C60), (-_S60, -_C60)), _TRIANGLE_APOTHEM),  # apex up
}
_MARGIN = 1.3  # radii kept between the object's centre and the border (triangle apex: 1.56)


@dataclass(frozen=True)
class Style:
    """What a generator draws and how its captions say it: attribute values, their words, the
    caption templates, and the background (static texture, or fresh noise in every frame)."""

    name: str
    shapes: tuple[str, ...]
    colours: dict[str, tuple[int, int, int]]
    sizes: dict[str, float]  # object radius as a fraction of the frame side
    words: dict[str, dict[str, tuple[str, ...]]]  # attribute -> value -> phrases
    templates: tuple[str, ...]
    frame_noise: float = 0.0  # std of the per-frame noise of the background; 0 = static grain

    @property
    def values(self) -> tuple[tuple[str, ...], ...]:
        """The values of shape, colour, size and direction, in that order."""
        return (self.shapes, tuple(self.colours), tuple(self.sizes), tuple(DIRECTIONS))

    @functools.cached_property
    def word_to_value(self) -> dict[str, tuple[str, str]]:
        """Word -> (attribute, value); only words that name a value (not "to", "the", ...)."""
        return {
            word: (attr, value)
            for attr, table in self.words.items()
            for value, phrases in table.items()
            for phrase in phrases
            for word in phrase.split()
            if word not in _FILLER
        }


_FILLER = ("to", "the", "toward")
DEMO = Style("demo", SHAPES, COLOURS, SIZES, ATTRIBUTE_WORDS, TEMPLATES)
NOISE = Style(
    "noise",
    shapes=("circle", "square", "triangle", "cross", "ring"),
    colours={
        "red": (215, 35, 35),
        "orange": (245, 140, 20),
        "yellow": (240, 230, 50),
        "green": (40, 190, 70),
        "cyan": (40, 210, 220),
        "blue": (40, 70, 230),
        "magenta": (220, 50, 200),
        "white": (245, 245, 245),
    },
    sizes={"small": 0.07, "medium": 0.12, "large": 0.18},
    words={
        "size": {"small": ("small", "little"), "medium": ("medium", "midsize"), "large": ("large", "huge", "big")},
        "colour": {
            "red": ("red",),
            "orange": ("orange",),
            "yellow": ("yellow",),
            "green": ("green",),
            "cyan": ("cyan", "turquoise"),
            "blue": ("blue",),
            "magenta": ("magenta", "pink"),
            "white": ("white",),
        },
        "shape": {
            "circle": ("circle", "dot"),
            "square": ("square", "tile"),
            "triangle": ("triangle", "wedge"),
            "cross": ("cross", "plus"),
            "ring": ("ring", "hoop", "donut"),
        },
        "direction": {
            "left": ("leftwards", "to the left", "left"),
            "right": ("rightwards", "to the right", "right"),
            "up": ("upwards", "to the top", "up"),
            "down": ("downwards", "to the bottom", "down"),
        },
    },
    templates=(
        "a {colour} {shape} of {size} size moves {direction}",
        "one {size} {colour} {shape} glides {direction} over the noise",
        "a {size} {shape} coloured {colour} goes {direction}",
        "the noisy clip shows a {size} {colour} {shape} going {direction}",
        "a {size} {colour} {shape} floats {direction}",
        "a {colour} {size} {shape} crosses the frame {direction}",
        "{size} {colour} {shape} moving {direction} through static",
    ),
    frame_noise=28.0,
)
STYLES = {s.name: s for s in (DEMO, NOISE)}


def style_of(style: str | Style) -> Style:
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    return STYLES[style]


MSRVTT_ANNOTATIONS = "train_val_videodatainfo.json"
MSVD_CAPTIONS = "captions.txt"
SPLITS = {
    "train": ("train", "train.txt"),
    "val": ("validate", "val.txt"),
    "test": ("test", "test.txt"),
}  # our name -> (MSR-VTT split name, MSVD list file)


@dataclass(frozen=True)
class ClipSpec:
    video_id: str
    split: str  # "train", "val" or "test"
    shape: str
    colour: str
    size: str
    direction: str
    seed: int  # background, position and travel; drawn independently of the attributes


def video_codec() -> str:
    """H.264 where this PyAV/FFmpeg build has libx264, else MPEG-4 part 2 (also plays in mp4)."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A dark gradient between two random tones plus fixed grain: not flat, never object-coloured,
    # and static, so the background adds nothing to the motion signal.
    lo, hi = rng.uniform(25, 80, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = (math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5)) / math.sqrt(0.5) + 0.5
    bg = lo + (hi - lo) * ramp[..., None]
    return bg + rng.normal(0, 4, size=(size, size, 3))


def _distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) from the shape centred at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - radius
    if shape == "ring":  # a band between 0.52 and 1.08 radii
        return np.abs(np.hypot(dx, dy) - 0.8 * radius) - 0.28 * radius
    if shape == "cross":  # two bars, 2.2 radii long and 0.76 wide
        bar = lambda a, b: np.maximum(np.abs(a) - 1.1 * radius, np.abs(b) - 0.38 * radius)  # noqa: E731
        return np.minimum(bar(dx, dy), bar(dy, dx))
    normals, apothem = _POLYGONS[shape]
    return np.max([nx * dx + ny * dy for nx, ny in normals], axis=0) - apothem * radius


def render_clip(
    shape: str,
    colour: str,
    size: str,
    direction: str,
    *,
    frame_size: int = 96,
    num_frames: int = 32,
    seed: int = 0,
    style: str | Style = "demo",
) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one clip; `seed` fixes background, position and travel.

    All random draws happen in the same order whatever the attributes, so two clips that differ
    only in direction share background, midpoint and travel, and (the path being symmetric in
    time) mirror each other in time: left vs right, or up vs down, have identical mean frames
    (for ``NOISE``, whose background changes every frame, the same holds in expectation).
    """
    st = style_of(style)
    if shape not in st.shapes or colour not in st.colours or size not in st.sizes:
        raise ValueError(f"unknown attributes {(shape, colour, size)!r} for style {st.name}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}")
    rng = np.random.default_rng(seed)
    bg = _background(rng, frame_size)
    radius = st.sizes[size] * frame_size
    lo, hi = _MARGIN * radius, frame_size - 1 - _MARGIN * radius  # allowed centre positions
    travel = rng.uniform(0.55, 0.9) * (hi - lo)
    # The midpoint along the motion is random but direction-blind, so it carries no direction.
    middle = rng.uniform(lo + travel / 2, hi - travel / 2)
    across = rng.uniform(lo, hi)
    ux, uy = DIRECTIONS[direction]
    t = np.arange(num_frames) - (num_frames - 1) / 2  # symmetric about 0: time-mirror = flip
    along = middle + travel * t / max(num_frames - 1, 1) * (ux + uy)
    cx = along if ux else np.full(num_frames, across)
    cy = along if uy else np.full(num_frames, across)
    yy, xx = np.mgrid[0:frame_size, 0:frame_size].astype(np.float64)
    d = _distance(shape, xx[None] - cx[:, None, None], yy[None] - cy[:, None, None], radius)
    alpha = np.clip(0.5 - d, 0.0, 1.0)[..., None]  # one-pixel soft edge against aliasing jitter
    if st.frame_noise:  # drawn after the path, so the path is the same as without it
        bg = bg[None] + 40 + rng.normal(0, st.frame_noise, size=(num_frames, frame_size, frame_size, 1))
    frames = bg * (1 - alpha) + np.asarray(st.colours[colour], np.float64) * alpha
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int, codec: str | None = None) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames as an mp4 (yuv420p) in memory."""
    codec = codec or video_codec()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # One thread: x264's output then depends only on the input, not on the machine's cores.
        stream.codec_context.thread_count = 1
        if codec == "mpeg4":
            stream.codec_context.bit_rate = 400_000  # the default (200k) smears small objects
        else:
            # mbtree off: with it, x264 gave different bytes for the same frames on some clips
            # (about 1 in 6 at 64x64, even single-threaded); without it, identical every time.
            stream.codec_context.options = {"crf": "20", "preset": "fast", "x264-params": "mbtree=0"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _balanced_attributes(n: int, rng: random.Random, style: Style = DEMO) -> list[tuple[str, str, str, str]]:
    """`n` (shape, colour, size, direction); each block (192 for ``DEMO``) is every combination once.

    Within a block the order is greedy: the next combination is the one whose values are least
    used so far, so even a short split (a small val/test) is close to balanced on every attribute.
    """
    values = style.values
    out: list[tuple[str, str, str, str]] = []
    while len(out) < n:
        pool = list(itertools.product(*values))
        rng.shuffle(pool)
        used = [Counter() for _ in values]
        while pool and len(out) < n:
            # Scaled by the number of values: one extra "small" is a bigger skew than one "red".
            best = min(range(len(pool)), key=lambda i: sum(used[a][v] * len(values[a]) for a, v in enumerate(pool[i])))
            combo = pool.pop(best)
            for a, v in enumerate(combo):
                used[a][v] += 1
            out.append(combo)
    return out


def clip_specs(n_train: int, n_val: int, n_test: int, seed: int, style: str | Style = "demo") -> list[ClipSpec]:
    """The corpus plan, a pure function of its arguments; ids video0.. run train, val, test."""
    st = style_of(style)
    specs: list[ClipSpec] = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = random.Random(split_seed(seed, f"video/{split}" if st is DEMO else f"video/{st.name}/{split}"))
        for attrs in _balanced_attributes(n, rng, st):
            specs.append(ClipSpec(f"video{len(specs)}", split, *attrs, seed=rng.getrandbits(63)))
    return specs


def make_captions(spec: ClipSpec, k: int, rng: random.Random | None = None, style: str | Style = "demo") -> list[str]:
    """`k` paraphrases: caption i of every clip uses template i and the i-th synonym of each
    word (cycling), so captions differ in structure and words within a clip, yet one phrasing
    of the clip's attributes is always among its references, as in a corpus whose annotators
    follow a style guide. A perfect captioner can then match a reference exactly (BLEU-4 1.0);
    with synonyms drawn at random per caption no captioner could. ``rng`` is not used."""
    st = style_of(style)
    attrs = {"size": spec.size, "colour": spec.colour, "shape": spec.shape, "direction": spec.direction}
    out = []
    for i in range(k):
        words = {a: st.words[a][v][i % len(st.words[a][v])] for a, v in attrs.items()}
        out.append(st.templates[i % len(st.templates)].format(**words))
    return out


def parse_caption(caption: str, style: str | Style = "demo") -> dict[str, str]:
    """Attributes a caption names, e.g. {"size": "small", ..., "direction": "left"}."""
    table = style_of(style).word_to_value
    found: dict[str, str] = {}
    for word in caption.lower().split():
        if word in table:
            attr, value = table[word]
            found[attr] = value
    return found


def caption_vocabulary(style: str | Style = "demo") -> set[str]:
    """Every word any caption can contain."""
    st = style_of(style)
    words = {w for t in st.templates for w in t.split() if not w.startswith("{")}
    return words | {w for table in st.words.values() for phrases in table.values() for p in phrases for w in p.split()}


_README = """# demo_video: synthetic video-caption corpus (style {style})

Generated offline by `pipeline.data.synthetic_video` (seed {seed}; same seed, identical
annotations). Layout: {layout}; clips {size}x{size}, {frames} frames at {fps} fps, codec {codec}.
Sizes: train {train}, val {val}, test {test}; {k} captions per clip.

One object per clip (shape: {shapes}; colour: {colours}; size: {sizes}) crosses a
{background} left, right, up or down. Captions paraphrase all four attributes from
{templates} templates with synonyms. The path is symmetric in time, so direction is not visible in
the mean frame: a captioner has to use the order of frames.
"""


def write_demo_video(
    root: str | os.PathLike,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    layout: str = "msrvtt",
    size: int = 96,
    num_frames: int = 32,
    fps: int = 16,
    captions_per_clip: int = 5,
    split_lists: bool = True,
    style: str | Style = "demo",
) -> dict:
    """Write the clips and annotations under `root` in the MSR-VTT or MSVD layout.

    `split_lists` applies to MSVD only (MSR-VTT keeps the split in its JSON); `style` is
    ``"demo"`` or ``"noise"`` (module docstring). Returns a summary: layout, codec, annotation
    file, counts per split, clips and captions.
    """
    st = style_of(style)
    if layout not in ("msrvtt", "msvd"):
        raise ValueError(f"layout must be 'msrvtt' or 'msvd', not {layout!r}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and >= 16 (yuv420p), not {size}")
    if num_frames < 2 or fps < 1 or captions_per_clip < 1 or min(n_train, n_val, n_test) < 0:
        raise ValueError("need num_frames >= 2, fps >= 1, captions_per_clip >= 1, counts >= 0")
    root = pathlib.Path(root)
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    codec = video_codec()
    specs = clip_specs(n_train, n_val, n_test, seed, st)
    captions = {s.video_id: make_captions(s, captions_per_clip, style=st) for s in specs}
    for s in specs:
        frames = render_clip(
            s.shape, s.colour, s.size, s.direction, frame_size=size, num_frames=num_frames, seed=s.seed, style=st
        )
        _atomic_write(videos / f"{s.video_id}.mp4", encode_mp4(frames, fps, codec))

    if layout == "msrvtt":
        annotations = root / MSRVTT_ANNOTATIONS
        doc = {
            "info": {
                "description": "synthetic demo video-caption corpus",
                "seed": seed,
                "generator": "pipeline.data.synthetic_video" + ("" if st is DEMO else f" ({st.name})"),
                "version": "1.0",
            },
            "videos": [
                {
                    "video_id": s.video_id,
                    "split": SPLITS[s.split][0],
                    "id": i,
                    "url": "",
                    "start time": 0.0,
                    "end time": num_frames / fps,
                    "category": 0,
                }
                for i, s in enumerate(specs)
            ],
            "sentences": [
                {"video_id": vid, "caption": c, "sen_id": i}
                for i, (vid, c) in enumerate((v, c) for v, cs in captions.items() for c in cs)
            ],
        }
        _atomic_write(annotations, json.dumps(doc, indent=1).encode())
    else:
        annotations = root / MSVD_CAPTIONS
        text = "".join(f"{vid} {c}\n" for vid, cs in captions.items() for c in cs)
        _atomic_write(annotations, text.encode())
        if split_lists:
            for split, (_, name) in SPLITS.items():
                ids = "".join(f"{s.video_id}\n" for s in specs if s.split == split)
                _atomic_write(root / name, ids.encode())

    counts = {"train": n_train, "val": n_val, "test": n_test}
    readme = _README.format(
        seed=seed,
        layout=layout,
        size=size,
        frames=num_frames,
        fps=fps,
        codec=codec,
        k=captions_per_clip,
        style=st.name,
        shapes=", ".join(st.shapes),
        colours=", ".join(st.colours),
        sizes=", ".join(st.sizes),
        background="background of fresh noise in every frame" if st.frame_noise else "dark textured background",
        templates=len(st.templates),
        **counts,
    )
    _atomic_write(root / "README.md", readme.encode())
    return {
        "root": str(root),
        "layout": layout,
        "codec": codec,
        "annotations": str(annotations),
        "videos": str(videos),
        "splits": counts,
        "clips": len(specs),
        "captions": len(specs) * captions_per_clip,
    }
