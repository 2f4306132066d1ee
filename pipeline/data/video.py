"""Video-caption corpora: list clips and captions, decode clips with PyAV on Ray Data.

Layouts (local paths or fsspec URIs):

* MSR-VTT (``data=msrvtt``, and the generated ``data=demo_video``): ``ROOT/videos/<video_id>.mp4``
  and ``ROOT/train_val_videodatainfo.json`` with ``videos`` (``video_id``, ``split``) and
  ``sentences`` (``video_id``, ``caption``).
* MSVD (``data=msvd``): clips in ``ROOT/videos`` and ``ROOT/captions.txt`` with one
  ``video_id caption`` per line; splits from ``ROOT/{train,val,test}.txt`` id lists (the
  ``data.*_split`` names) when all three exist, else by a hash of the video id.
* Precomputed features (``data=video_features``): ``data.files`` globs ``.npy`` files (one per
  video, ``(frames, dims)``, named ``<video_id>.npy``) or Parquet files with ``video_id`` and
  ``features`` columns; captions in ``data.captions_file`` (``.json`` MSR-VTT or ``.txt`` MSVD).

Clip bytes are read with ``ray.data.read_binary_files`` and decoded inside ``map_batches``:
K frames sampled uniformly (or at ``data.fps``), resized to ``frame_size`` squared, RGB uint8.
Decoded frames (``frame_encoder=cnn``) or frozen-backbone features (``frozen``) are cached
as Parquet keyed by (content hash, encoder, sampling), so a second run does not decode again.
A clip that cannot be decoded raises :class:`DataError` naming the file, or with
``on_bad_rows=skip`` is dropped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .readers import DataError, absolute, check_root, expand

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
# Training numbers each (video, caption) pair video id * 1024 + caption index
# (pipeline/train/batching.py: caption_pairs), so a video with more would collide with the next.
MAX_CAPTIONS_PER_VIDEO = 1024


# ---------------------------------------------------------------- decoding (PyAV)


def sample_indices(n: int, k: int) -> np.ndarray:
    """K frame indices spread uniformly over n frames (centres of K equal spans); a clip
    shorter than K repeats frames, so every clip yields exactly K."""
    return np.minimum(((np.arange(k) + 0.5) * n / k).astype(np.int64), n - 1)


class TruncatedClip(DataError):
    """A clip that ends (or breaks off) before the frames its container promised."""


def _frame_count(data: bytes, name: str, demux: bool = True) -> int:
    """Frames in the clip's first video stream: the container's count when it gives one, else
    (with ``demux``) its packets counted by a demux pass, without decoding; else 0."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise DataError(f"{name}: no video stream")
        stream = container.streams.video[0]
        if stream.frames or not demux:
            return int(stream.frames or 0)
        return sum(1 for packet in container.demux(stream) if packet.size)  # the flush packet is empty


def decode_clip(data: bytes, num_frames: int, frame_size: int, fps: float = 0.0, name: str = "clip") -> np.ndarray:
    """Video bytes -> (K, frame_size, frame_size, 3) uint8 RGB.

    fps = 0: K frames uniformly over the clip; fps > 0: one frame every 1/fps seconds from
    the start, at most K (so clips of different lengths give different K). Only the sampled
    frames are converted and kept, so memory does not grow with the clip's length; decoding
    stops once they are all in. A clip that ends before the frames its container gives (cut
    short or damaged) raises :class:`TruncatedClip`.
    """
    import av

    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        expected = _frame_count(data, name, demux=fps <= 0)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e
    if fps <= 0 and not expected:
        raise DataError(f"{name}: no frames could be decoded")
    wanted = sample_indices(expected, num_frames) if fps <= 0 else None
    needed = set(wanted.tolist()) if wanted is not None else set()

    def convert(frame: Any) -> np.ndarray:
        # Resize while converting: area averaging keeps small objects visible when shrinking.
        return frame.to_ndarray(format="rgb24", width=frame_size, height=frame_size, interpolation="AREA")

    kept: dict[int, np.ndarray] = {}  # fps = 0: frame index -> frame
    picks: list[np.ndarray] = []  # fps > 0: the frames picked so far, in order
    want: np.ndarray | None = None
    last, n, error = None, 0, None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else n / 25.0
                if wanted is not None:
                    if n in needed:
                        kept[n] = convert(frame)
                    n += 1
                    if len(kept) == len(needed):
                        break
                    continue
                if want is None:
                    want = t + np.arange(num_frames) / fps
                if len(picks) < num_frames and want[len(picks)] <= t:
                    arr = convert(frame)
                    while len(picks) < num_frames and want[len(picks)] <= t:  # first frame at or after each time
                        picks.append(arr)
                last, n = (frame, t), n + 1
                if len(picks) == num_frames:
                    break
    except Exception as e:
        if not n:
            raise DataError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e
        error = e
    if wanted is not None:
        if len(kept) < len(needed):
            why = f": {type(error).__name__}: {error}" if error else ""
            raise TruncatedClip(f"{name}: truncated: {n} of {expected} frames decoded{why}")
        return np.stack([kept[i] for i in wanted.tolist()])
    if error is not None or (expected and n < expected and len(picks) < num_frames):
        why = f" ({type(error).__name__}: {error})" if error else ""
        raise TruncatedClip(f"{name}: truncated: {n} of {expected or 'an unknown number of'} frames decoded{why}")
    if last is None:
        raise DataError(f"{name}: no frames could be decoded")
    if want is not None and len(picks) < num_frames and want[len(picks)] <= last[1] + 1e-6:
        picks.append(convert(last[0]))  # a sample time within rounding of the last frame
    return np.stack(picks)


# ---------------------------------------------------------------- feature cache


def sampling_key(cfg: Any) -> str:
    return f"k{cfg.num_frames}-fps{cfg.fps:g}-s{cfg.frame_size}"


def encoder_key(cfg: Any) -> str:
    """'frames' for end-to-end CNN training, else the backbone file's content hash."""
    if cfg.frame_encoder == "cnn":
        return "frames"
    with fsspec.open(absolute(cfg.backbone), "rb") as f:
        return "backbone-" + hashlib.sha256(f.read()).hexdigest()[:16]


class FeatureCache:
    """One small Parquet file per (content hash, encoder, sampling): ``data``, ``shape``, ``dtype``."""

    def __init__(self, root: str, encoder: str, sampling: str):
        self.dir = f"{absolute(root).rstrip('/')}/{encoder}/{sampling}" if root else ""
        self.error = ""  # why the last get() could not read an entry that is there

    def _path(self, content_hash: str) -> str:
        return f"{self.dir}/{content_hash[:2]}/{content_hash}.parquet"

    def get(self, content_hash: str) -> np.ndarray | None:
        self.error = ""
        if not self.dir:
            return None
        fs, p = fsspec.core.url_to_fs(self._path(content_hash))
        if not fs.exists(p):
            return None
        try:
            with fs.open(p, "rb") as f:
                row = pq.read_table(f).to_pylist()[0]
            return np.frombuffer(row["data"], dtype=row["dtype"]).reshape(row["shape"])
        except Exception as e:
            self.error = f"{self._path(content_hash)}: {type(e).__name__}: {e}"
            return None

    def put(self, content_hash: str, array: np.ndarray) -> None:
        if not self.dir:
            return
        fs, p = fsspec.core.url_to_fs(self._path(content_hash))
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        table = pa.table(
            {"data": [np.ascontiguousarray(array).tobytes()], "shape": [list(array.shape)], "dtype": [str(array.dtype)]}
        )
        tmp = f"{p}.{os.getpid()}.tmp"  # written aside, then moved: readers never see half a file
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, p)


# ---------------------------------------------------------------- listing


def _load_json(path: str) -> Any:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise DataError(f"captions file {path} does not exist")
    try:
        with fs.open(p, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def _field(obj: Any, key: str, where: str, path: str) -> str:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(
            f"{path}: {where} has no '{key}' field (MSR-VTT layout: videos need video_id and split, "
            f"sentences need video_id and caption)"
        )
    return str(obj[key])


def read_msrvtt(
    path: str, split_names: dict[str, str]
) -> tuple[dict[str, str], list[tuple[str, str, str]], dict[str, str]]:
    """-> ({video_id: split}, [(video_id, caption, where)], {video_id: why} for videos listed
    in two splits); split names mapped to train/val/test."""
    ann = _load_json(path)
    if (
        not isinstance(ann, dict)
        or not isinstance(ann.get("videos"), list)
        or not isinstance(ann.get("sentences"), list)
    ):
        raise DataError(f"{path}: expected an object with 'videos' and 'sentences' lists (MSR-VTT layout)")
    splits: dict[str, str] = {}
    first: dict[str, int] = {}
    conflicts: dict[str, str] = {}
    for i, v in enumerate(ann["videos"]):
        vid, raw = _field(v, "video_id", f"videos[{i}]", path), _field(v, "split", f"videos[{i}]", path)
        if raw not in split_names:
            raise DataError(
                f"{path}: videos[{i}] ({vid}) has split '{raw}'; expected one of {sorted(split_names)} "
                "(set data.train_split / data.val_split / data.test_split)"
            )
        if vid in splits and splits[vid] != split_names[raw]:
            conflicts.setdefault(
                vid,
                f"{path}: videos[{i}]: video '{vid}' is listed in split '{raw}' and, at "
                f"videos[{first[vid]}], in another split",
            )
            continue
        splits[vid] = split_names[raw]
        first.setdefault(vid, i)
    caps = [
        (
            _field(s, "video_id", f"sentences[{i}]", path),
            _field(s, "caption", f"sentences[{i}]", path),
            f"{path}: sentences[{i}]",
        )
        for i, s in enumerate(ann["sentences"])
    ]
    return splits, caps, conflicts


def read_msvd_captions(path: str, skip: bool, dropped: dict[str, int]) -> list[tuple[str, str, str]]:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise DataError(f"captions file {path} does not exist")
    out = []
    with fs.open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                err = DataError(f"{path}:{n}: invalid UTF-8 at byte {e.start}")
                if not skip:
                    raise err from e
                dropped["invalid_utf8"] = dropped.get("invalid_utf8", 0) + 1
                continue
            if not line.strip():
                continue
            parts = line.strip().split(None, 1)
            if len(parts) < 2:
                if not skip:
                    raise DataError(f"{path}:{n}: expected 'video_id caption', got {line[:80]!r}")
                dropped["malformed"] = dropped.get("malformed", 0) + 1
                continue
            out.append((parts[0], parts[1], f"{path}:{n}"))
    return out


def _hash_split(video_id: str, cfg: Any) -> str:
    u = zlib.crc32(video_id.encode()) / 2**32
    return "test" if u < cfg.test_fraction else "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def _msvd_splits(root: str, ids: list[str], cfg: Any) -> tuple[dict[str, str], dict[str, str]]:
    """({video_id: split}, {video_id: why} for videos listed in two split files)."""
    names = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    files = {s: f"{root}/{n}.txt" for s, n in names.items() if n}
    fs = fsspec.core.url_to_fs(root)[0]
    if len(files) == 3 and all(fs.exists(fsspec.core.url_to_fs(p)[1]) for p in files.values()):
        splits: dict[str, str] = {}
        where: dict[str, str] = {}
        conflicts: dict[str, str] = {}
        for split, path in files.items():
            lines = fs.cat_file(fsspec.core.url_to_fs(path)[1]).decode("utf-8-sig").splitlines()
            for n, line in enumerate(lines, 1):
                for vid in line.split():
                    if vid in splits and splits[vid] != split:
                        conflicts.setdefault(vid, f"{path}:{n}: video '{vid}' is also listed in {where[vid]}")
                    elif vid not in splits:
                        splits[vid], where[vid] = split, f"{path}:{n}"
        for vid in conflicts:
            del splits[vid]
        return splits, conflicts
    return {vid: _hash_split(vid, cfg) for vid in ids}, {}


def _find_clips(videos_dir: str) -> dict[str, list[str]]:
    """{video_id: [clip paths]}, sorted; more than one path is a duplicate id."""
    fs, p = fsspec.core.url_to_fs(videos_dir)
    if not fs.isdir(p):
        raise DataError(f"videos folder {videos_dir} does not exist")
    protocol = videos_dir.split("://", 1)[0] + "://" if "://" in videos_dir else ""
    clips: dict[str, list[str]] = {}
    for f in sorted(fs.find(p)):
        base = f.rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(base)
        if ext.lower() in VIDEO_EXTENSIONS:
            clips.setdefault(stem, []).append(f if f.startswith(protocol) else protocol + f)
    return clips


def _feature_files(cfg: Any, skip: bool, errors: list[str]) -> dict[str, list[str]]:
    """{video_id: [where]} over the feature files; a Parquet file's video ids are read here
    (one column), so duplicates and missing videos are known before any features are."""
    out: dict[str, list[str]] = {}
    for path in expand(cfg.files):
        if path.endswith(".npy"):
            out.setdefault(os.path.basename(path).split(".")[0], []).append(path)
        elif path.endswith(".parquet"):
            try:
                with fsspec.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    if not {"video_id", "features"} <= set(pf.schema_arrow.names):
                        raise DataError(
                            f"{path}: feature Parquet needs columns video_id and features; it has "
                            f"{pf.schema_arrow.names}"
                        )
                    ids = pf.read(columns=["video_id"]).column("video_id").to_pylist()
            except DataError:
                raise
            except Exception as e:
                err = DataError(f"{path}: cannot read features ({type(e).__name__}: {e})")
                if not skip:
                    raise err from e
                errors.append(str(err))  # its videos are then missing, and counted so
                continue
            for row, vid in enumerate(ids):
                out.setdefault(str(vid), []).append(f"{path}#{row}")
        else:
            raise DataError(f"{path}: feature files must be .npy (one per video) or .parquet (video_id, features)")
    return out


def list_corpus(cfg: Any) -> dict[str, Any]:
    """Clips (or feature files), their splits and raw captions, with drop counts so far.

    Returns {"sources": {video_id: path}, "source_rows": {video_id: path or path#row},
    "splits": {video_id: split}, "captions": {video_id: [caption, ...]}, "dropped": {reason:
    captions}, "captions_read": n, "missing_videos": [...], "videos_dropped": {reason: videos},
    "videos_read": n, "errors": [...]}. Every video id met (listed, or with a clip or features)
    is read once, plus once per extra copy; each is then kept or dropped for one reason.
    """
    skip = cfg.on_bad_rows == "skip"
    root = absolute(cfg.root).rstrip("/")
    check_root(cfg)
    dropped: dict[str, int] = {}
    vdropped: dict[str, int] = {}
    errors: list[str] = []

    def drop(counts: dict[str, int], reason: str, n: int = 1) -> None:
        counts[reason] = counts.get(reason, 0) + n

    ann = absolute(cfg.captions_file) if cfg.captions_file else ""
    conflicts: dict[str, str] = {}
    if cfg.name in ("msrvtt", "demo_video") or (cfg.name == "video_features" and ann.endswith(".json")):
        names = {cfg.train_split: "train", cfg.val_split: "val", cfg.test_split: "test"}
        splits, caps, conflicts = read_msrvtt(
            ann or f"{root}/train_val_videodatainfo.json", {k: v for k, v in names.items() if k}
        )
        for vid in conflicts:
            del splits[vid]
    else:
        caps = read_msvd_captions(ann or f"{root}/captions.txt", skip, dropped)
        splits = {}
    captions_read = len(caps) + sum(dropped.values())  # lines dropped while reading are not in caps
    if cfg.name == "video_features":
        found = _feature_files(cfg, skip, errors)
    else:
        found = _find_clips(absolute(cfg.videos_dir) if cfg.videos_dir else f"{root}/videos")
    if cfg.name == "msvd" or (cfg.name == "video_features" and not splits):
        ids = sorted({v for v, _, _ in caps})
        if cfg.name == "msvd":
            splits, conflicts = _msvd_splits(root, ids, cfg)
        else:
            splits = {v: _hash_split(v, cfg) for v in ids}
    if conflicts:
        vid, why = next(iter(conflicts.items()))
        if not skip:
            raise DataError(
                f"{why}; a video belongs to one split (set data.on_bad_rows=skip to drop the "
                f"{len(conflicts)} such video(s))"
            )
        drop(vdropped, "conflicting_split", len(conflicts))
    dups = {vid: where for vid, where in found.items() if len(where) > 1}
    if dups:
        vid, where = next(iter(sorted(dups.items())))
        if not skip:
            raise DataError(
                f"video id '{vid}' has {len(where)} clips or feature rows: {', '.join(where[:3])} "
                f"({len(dups)} such id(s)); set data.on_bad_rows=skip to keep the first of each"
            )
        # The first in path order is kept, the other copies counted: which copy the captions
        # describe is unknown, and this choice is at least the same on every run.
        drop(vdropped, "duplicate_video", sum(len(w) - 1 for w in dups.values()))
    source_rows = {vid: where[0] for vid, where in found.items() if vid not in conflicts}
    sources = {vid: where.split("#", 1)[0] for vid, where in source_rows.items()}
    missing = sorted(v for v in splits if v not in sources)
    if missing and not skip:
        where = "data.files" if cfg.name == "video_features" else (cfg.videos_dir or root + "/videos")
        raise DataError(
            f"{len(missing)} video(s) with captions have no clip or feature file, e.g. '{missing[0]}' "
            f"(looked in {where}); set data.on_bad_rows=skip to drop them"
        )
    if missing:
        drop(vdropped, "missing_video", len(missing))
    not_listed = [v for v in sources if v not in splits]
    if not_listed:  # a clip or feature row that no annotation names: read, never used
        drop(vdropped, "not_listed", len(not_listed))
    captions: dict[str, list[str]] = {}
    missing_set = set(missing)
    for vid, caption, where in caps:
        if vid in conflicts:
            drop(dropped, "conflicting_split")
        elif vid not in splits:
            if not skip:
                raise DataError(f"{where}: caption for video '{vid}', which is not listed in the corpus's videos")
            drop(dropped, "caption_unknown_video")
        elif vid in missing_set:
            drop(dropped, "missing_video")
        elif len(captions.get(vid, ())) >= MAX_CAPTIONS_PER_VIDEO:
            if not skip:
                raise DataError(
                    f"{where}: video '{vid}' has more than {MAX_CAPTIONS_PER_VIDEO} captions (training "
                    f"numbers each (video, caption) pair as video id * {MAX_CAPTIONS_PER_VIDEO} + caption "
                    "index); set data.on_bad_rows=skip to keep the first ones"
                )
            drop(dropped, "too_many_captions")
        else:
            captions.setdefault(vid, []).append(caption)
    known = set(splits) | set(sources) | set(conflicts)
    return {
        "sources": sources,
        "source_rows": source_rows,
        "splits": splits,
        "captions": captions,
        "dropped": dropped,
        "captions_read": captions_read,
        "missing_videos": missing,
        "videos_dropped": vdropped,
        "videos_read": len(known) + vdropped.get("duplicate_video", 0),
        "errors": errors,
    }


# ---------------------------------------------------------------- Ray Data UDFs


def _error_row(vid: str, path: str, err: str, reason: str = "bad_video") -> dict[str, Any]:
    return {
        "video_id": vid,
        "path": path,
        "data": b"",
        "shape": [],
        "dtype": "",
        "reason": reason,
        "error": err,
        "cache_hit": False,
    }


def decode_clips(batch: dict[str, np.ndarray], params: dict[str, Any]) -> pa.Table:
    """map_batches UDF over ``read_binary_files`` rows (path, bytes): cache lookup by content
    hash, else PyAV decode + sampling (and the cache write for ``frames``)."""
    cache = FeatureCache(params["cache_root"], params["encoder"], params["sampling"])
    rows = []
    for path, data in zip(batch["path"], batch["bytes"]):
        vid = os.path.splitext(os.path.basename(path))[0]
        h = hashlib.sha256(data).hexdigest()
        cached = cache.get(h)
        if cached is not None:
            rows.append(_clip_row(vid, path, cached, True))
            continue
        cache_error = cache.error
        try:
            frames = decode_clip(data, params["num_frames"], params["frame_size"], params["fps"], path)
        except DataError as e:
            if not params["skip"]:
                raise
            rows.append(
                {
                    **_error_row(vid, path, str(e), "truncated_video" if isinstance(e, TruncatedClip) else "bad_video"),
                    "cache_error": cache_error,
                }
            )
            continue
        if params["encoder"] == "frames":
            cache.put(h, frames)
        rows.append({**_clip_row(vid, path, frames, False), "content_hash": h, "cache_error": cache_error})
    return _table(rows)


def _clip_row(vid: str, path: str, arr: np.ndarray, hit: bool) -> dict[str, Any]:
    return {
        "video_id": vid,
        "path": path,
        "data": arr.tobytes(),
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "reason": "",
        "error": "",
        "cache_hit": hit,
    }


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = ["video_id", "path", "data", "shape", "dtype", "reason", "error", "cache_hit", "content_hash", "cache_error"]
    types = [
        pa.string(),
        pa.string(),
        pa.binary(),
        pa.list_(pa.int32()),
        pa.string(),
        pa.string(),
        pa.string(),
        pa.bool_(),
        pa.string(),
        pa.string(),
    ]
    return pa.table({c: pa.array([r.get(c, "") for r in rows], type=t) for c, t in zip(cols, types)})


class FrozenBackbone:
    """Actor-pool UDF: frames (K, H, W, 3) uint8 -> features (K, D) float16 with a TorchScript
    backbone the user gives (loaded once per actor; on a GPU when the actor has one)."""

    MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

    def __init__(self, backbone: str, cache_root: str, encoder: str, sampling: str):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        with fsspec.open(absolute(backbone), "rb") as f:
            self.net = torch.jit.load(io.BytesIO(f.read()), map_location=self.device).eval()
        self.cache = FeatureCache(cache_root, encoder, sampling)

    def features(self, frames: np.ndarray) -> np.ndarray:
        import torch

        x = (frames.astype(np.float32) / 255.0 - self.MEAN) / self.STD
        with torch.no_grad():
            out = self.net(torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device))
            if out.dim() == 4:  # a conv trunk: pool the spatial map
                out = out.mean(dim=(2, 3))
        return out.float().cpu().numpy().astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for i in range(len(batch["video_id"])):
            r = {k: batch[k][i] for k in batch}
            if not r["reason"] and r["dtype"] == "uint8":
                frames = np.frombuffer(r["data"], dtype=np.uint8).reshape([int(x) for x in r["shape"]])
                feats = self.features(frames)
                self.cache.put(str(r["content_hash"]), feats)
                r.update(data=feats.tobytes(), shape=list(feats.shape), dtype="float16")
            rows.append(r)
        return _table(rows)


def load_feature_files(batch: dict[str, np.ndarray], skip: bool, wanted: dict[str, str]) -> pa.Table:
    """map_batches UDF over feature files: .npy (one video) or Parquet (video_id, features).

    ``wanted`` maps each captioned video to the file (``path``, or ``path#row`` for Parquet)
    whose features it takes; other rows (duplicates, videos without captions) were counted
    on the driver and are not loaded."""
    rows = []
    for path in batch["path"]:
        fs, p = fsspec.core.url_to_fs(path)
        if path.endswith(".npy"):
            vids = [os.path.basename(path).split(".")[0]]
        else:
            vids = [v for v, where in wanted.items() if where.split("#", 1)[0] == path]
        try:
            with fs.open(p, "rb") as f:
                raw = f.read()
            if path.endswith(".npy"):
                items = [(vids[0], np.load(io.BytesIO(raw), allow_pickle=False))]
            else:
                table = pq.read_table(io.BytesIO(raw), columns=["video_id", "features"])
                items = [
                    (str(v), np.asarray([np.asarray(x, dtype=np.float32) for x in f]))
                    for r, (v, f) in enumerate(
                        zip(table.column("video_id").to_pylist(), table.column("features").to_pylist())
                    )
                    if wanted.get(str(v)) == f"{path}#{r}"
                ]
        except Exception as e:
            err = DataError(f"{path}: cannot read features ({type(e).__name__}: {e})")
            if not skip:
                raise err from e
            rows += [_error_row(vid, path, str(err)) for vid in vids if vid in wanted]
            continue
        for vid, arr in items:
            if vid not in wanted:
                continue
            if arr.ndim != 2 or not arr.size or not np.isfinite(arr).all():
                err = DataError(
                    f"{path}: features of '{vid}' must be a finite (frames, dims) array, got shape {arr.shape}"
                )
                if not skip:
                    raise err
                rows.append(_error_row(vid, path, str(err)))
                continue
            rows.append(_clip_row(vid, path, arr.astype(np.float16), False))
    return _table(rows)


def attach_captions(batch: dict[str, np.ndarray], meta: dict[str, Any]) -> pa.Table:
    """Join the decoded rows with split, id and encoded captions (a dict shipped with the task)."""
    out: dict[str, list] = {
        k: []
        for k in (
            "id",
            "video_id",
            "split",
            "path",
            "data",
            "shape",
            "dtype",
            "src_len",
            "captions",
            "caption_ids",
            "reason",
            "error",
            "cache_hit",
            "n_captions",
            "cache_error",
        )
    }
    for i, vid in enumerate(batch["video_id"]):
        m = meta.get(vid)
        reason = str(batch["reason"][i])
        if m is None:
            reason = reason or "no_captions"
            m = {"id": -1, "split": "", "captions": [], "caption_ids": []}
        shape = [int(x) for x in batch["shape"][i]]
        out["id"].append(m["id"])
        out["video_id"].append(vid)
        out["split"].append(m["split"])
        out["path"].append(batch["path"][i])
        out["data"].append(batch["data"][i])
        out["shape"].append(shape)
        out["dtype"].append(batch["dtype"][i])
        out["src_len"].append(shape[0] if shape else 0)
        out["captions"].append(m["captions"])
        out["caption_ids"].append(m["caption_ids"])
        out["reason"].append(reason)
        out["error"].append(batch["error"][i])
        out["cache_hit"].append(bool(batch["cache_hit"][i]))
        out["n_captions"].append(len(m["captions"]))
        out["cache_error"].append(batch["cache_error"][i] if "cache_error" in batch else "")
    return pa.table(
        {
            "id": pa.array(out["id"], pa.int64()),
            "video_id": pa.array(out["video_id"], pa.string()),
            "split": pa.array(out["split"], pa.string()),
            "path": pa.array(out["path"], pa.string()),
            "data": pa.array(out["data"], pa.binary()),
            "shape": pa.array(out["shape"], pa.list_(pa.int32())),
            "dtype": pa.array(out["dtype"], pa.string()),
            "src_len": pa.array(out["src_len"], pa.int32()),
            "captions": pa.array(out["captions"], pa.list_(pa.string())),
            "caption_ids": pa.array(out["caption_ids"], pa.list_(pa.list_(pa.int32()))),
            "reason": pa.array(out["reason"], pa.string()),
            "error": pa.array(out["error"], pa.string()),
            "cache_hit": pa.array(out["cache_hit"], pa.bool_()),
            "n_captions": pa.array(out["n_captions"], pa.int32()),
            "cache_error": pa.array(out["cache_error"], pa.string()),
        }
    )


def clip_array(data: bytes, shape: Any, dtype: str) -> np.ndarray:
    """A stored clip (frames uint8 or features float16) back to its array."""
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape([int(x) for x in shape])


def pad_clips(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Clips (K_i, ...) -> zero-padded (B, max K, ...) and lengths (B,)."""
    k = max(len(c) for c in clips)
    out = np.zeros((len(clips), k, *clips[0].shape[1:]), dtype=clips[0].dtype)
    for r, c in enumerate(clips):
        out[r, : len(c)] = c
    return out, np.asarray([len(c) for c in clips], dtype=np.int64)
