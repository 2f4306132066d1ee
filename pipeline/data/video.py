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

from .readers import DataError, absolute, expand

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")
MSRVTT_SPLITS = ("train", "validate", "test")


# ---------------------------------------------------------------- decoding (PyAV)

def sample_indices(n: int, k: int) -> np.ndarray:
    """K frame indices spread uniformly over n frames (centres of K equal spans); a clip
    shorter than K repeats frames, so every clip yields exactly K."""
    return np.minimum(((np.arange(k) + 0.5) * n / k).astype(np.int64), n - 1)


def decode_clip(data: bytes, num_frames: int, frame_size: int, fps: float = 0.0, name: str = "clip") -> np.ndarray:
    """Video bytes -> (K, frame_size, frame_size, 3) uint8 RGB.

    fps = 0: K frames uniformly over the clip; fps > 0: one frame every 1/fps seconds from
    the start, at most K (so clips of different lengths give different K).
    """
    import av

    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    frames, times = [], []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DataError(f"{name}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                # Resize while converting: keeping full-size frames of a long clip would cost
                # hundreds of MB; area averaging keeps small objects visible when shrinking.
                frames.append(frame.to_ndarray(format="rgb24", width=frame_size, height=frame_size,
                                               interpolation="AREA"))
                times.append(float(frame.time) if frame.time is not None else len(times) / 25.0)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many kinds; all mean "unreadable"
        if not frames:
            raise DataError(f"{name}: cannot decode video ({type(e).__name__}: {e})") from e
        # A truncated tail still leaves the frames decoded so far; keep them.
    if not frames:
        raise DataError(f"{name}: no frames could be decoded")
    if fps > 0:
        t0 = times[0]
        want = t0 + np.arange(num_frames) / fps
        want = want[want <= times[-1] + 1e-6]  # no sample past the last frame
        idx = np.searchsorted(np.asarray(times), want).clip(0, len(frames) - 1)
    else:
        idx = sample_indices(len(frames), num_frames)
    return np.stack([frames[i] for i in idx])


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

    def _path(self, content_hash: str) -> str:
        return f"{self.dir}/{content_hash[:2]}/{content_hash}.parquet"

    def get(self, content_hash: str) -> np.ndarray | None:
        if not self.dir:
            return None
        fs, p = fsspec.core.url_to_fs(self._path(content_hash))
        if not fs.exists(p):
            return None
        try:
            with fs.open(p, "rb") as f:
                row = pq.read_table(f).to_pylist()[0]
            return np.frombuffer(row["data"], dtype=row["dtype"]).reshape(row["shape"])
        except Exception:  # noqa: BLE001 - a damaged cache entry is a miss, recomputed and rewritten
            return None

    def put(self, content_hash: str, array: np.ndarray) -> None:
        if not self.dir:
            return
        fs, p = fsspec.core.url_to_fs(self._path(content_hash))
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        table = pa.table({"data": [np.ascontiguousarray(array).tobytes()], "shape": [list(array.shape)],
                          "dtype": [str(array.dtype)]})
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
        raise DataError(f"{path}: {where} has no '{key}' field (MSR-VTT layout: videos need video_id and split, "
                        f"sentences need video_id and caption)")
    return str(obj[key])


def read_msrvtt(path: str, split_names: dict[str, str]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """-> ({video_id: split}, [(video_id, caption, where)]); split names mapped to train/val/test."""
    ann = _load_json(path)
    if not isinstance(ann, dict) or not isinstance(ann.get("videos"), list) or not isinstance(ann.get("sentences"), list):
        raise DataError(f"{path}: expected an object with 'videos' and 'sentences' lists (MSR-VTT layout)")
    splits: dict[str, str] = {}
    for i, v in enumerate(ann["videos"]):
        vid, raw = _field(v, "video_id", f"videos[{i}]", path), _field(v, "split", f"videos[{i}]", path)
        if raw not in split_names:
            raise DataError(f"{path}: videos[{i}] ({vid}) has split '{raw}'; expected one of {sorted(split_names)} "
                            "(set data.train_split / data.val_split / data.test_split)")
        splits[vid] = split_names[raw]
    caps = [(_field(s, "video_id", f"sentences[{i}]", path), _field(s, "caption", f"sentences[{i}]", path),
             f"{path}: sentences[{i}]") for i, s in enumerate(ann["sentences"])]
    return splits, caps


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


def _msvd_splits(root: str, ids: list[str], cfg: Any) -> dict[str, str]:
    names = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    files = {s: f"{root}/{n}.txt" for s, n in names.items() if n}
    fs = fsspec.core.url_to_fs(root)[0]
    if len(files) == 3 and all(fs.exists(fsspec.core.url_to_fs(p)[1]) for p in files.values()):
        splits: dict[str, str] = {}
        for split, path in files.items():
            for vid in fs.cat_file(fsspec.core.url_to_fs(path)[1]).decode("utf-8-sig").split():
                splits.setdefault(vid, split)
        return splits
    return {vid: _hash_split(vid, cfg) for vid in ids}


def _find_clips(videos_dir: str) -> dict[str, str]:
    fs, p = fsspec.core.url_to_fs(videos_dir)
    if not fs.isdir(p):
        raise DataError(f"videos folder {videos_dir} does not exist")
    protocol = videos_dir.split("://", 1)[0] + "://" if "://" in videos_dir else ""
    clips = {}
    for f in sorted(fs.find(p)):
        base = f.rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(base)
        if ext.lower() in VIDEO_EXTENSIONS:
            clips.setdefault(stem, f if f.startswith(protocol) else protocol + f)
    return clips


def _feature_files(cfg: Any) -> dict[str, str]:
    out = {}
    for path in expand(cfg.files):
        stem = os.path.basename(path).split(".")[0]
        if path.endswith(".npy"):
            out[stem] = path
        elif path.endswith(".parquet"):
            out[f"parquet:{path}"] = path
        else:
            raise DataError(f"{path}: feature files must be .npy (one per video) or .parquet (video_id, features)")
    return out


def list_corpus(cfg: Any) -> dict[str, Any]:
    """Clips (or feature files), their splits and raw captions, with drop counts so far.

    Returns {"sources": {video_id or parquet:path: path}, "splits": {video_id: split},
    "captions": {video_id: [caption, ...]}, "dropped": {reason: captions}, "captions_read": n}.
    """
    skip = cfg.on_bad_rows == "skip"
    root = absolute(cfg.root).rstrip("/")
    fs, p = fsspec.core.url_to_fs(root)
    if cfg.name != "video_features" and not fs.exists(p):
        raise DataError(f"data.root '{cfg.root}' does not exist")
    dropped: dict[str, int] = {}
    ann = absolute(cfg.captions_file) if cfg.captions_file else ""
    if cfg.name in ("msrvtt", "demo_video") or (cfg.name == "video_features" and ann.endswith(".json")):
        names = {cfg.train_split: "train", cfg.val_split: "val", cfg.test_split: "test"}
        splits, caps = read_msrvtt(ann or f"{root}/train_val_videodatainfo.json", {k: v for k, v in names.items() if k})
    else:
        caps = read_msvd_captions(ann or f"{root}/captions.txt", skip, dropped)
        splits = {}
    captions_read = len(caps) + sum(dropped.values())  # lines dropped while reading are not in caps
    if cfg.name == "video_features":
        sources = _feature_files(cfg)
    else:
        sources = _find_clips(absolute(cfg.videos_dir) if cfg.videos_dir else f"{root}/videos")
    if cfg.name == "msvd" or (cfg.name == "video_features" and not splits):
        ids = sorted({v for v, _, _ in caps})
        splits = _msvd_splits(root, ids, cfg) if cfg.name == "msvd" else {v: _hash_split(v, cfg) for v in ids}
    parquet_sources = any(k.startswith("parquet:") for k in sources)
    missing = sorted(v for v in splits if v not in sources and not parquet_sources)
    if missing and not skip:
        where = "data.files" if cfg.name == "video_features" else (cfg.videos_dir or root + "/videos")
        raise DataError(f"{len(missing)} video(s) with captions have no clip or feature file, e.g. '{missing[0]}' "
                        f"(looked in {where}); set data.on_bad_rows=skip to drop them")
    captions: dict[str, list[str]] = {}
    for vid, caption, where in caps:
        if vid not in splits:
            if not skip:
                raise DataError(f"{where}: caption for video '{vid}', which is not listed in the corpus's videos")
            dropped["caption_unknown_video"] = dropped.get("caption_unknown_video", 0) + 1
        elif vid in missing:
            dropped["missing_video"] = dropped.get("missing_video", 0) + 1
        else:
            captions.setdefault(vid, []).append(caption)
    return {"sources": sources, "splits": splits, "captions": captions, "dropped": dropped,
            "captions_read": captions_read, "missing_videos": missing}


# ---------------------------------------------------------------- Ray Data UDFs

def _error_row(vid: str, path: str, err: str) -> dict[str, Any]:
    return {"video_id": vid, "path": path, "data": b"", "shape": [], "dtype": "", "reason": "bad_video",
            "error": err, "cache_hit": False}


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
        try:
            frames = decode_clip(data, params["num_frames"], params["frame_size"], params["fps"], path)
        except DataError as e:
            if not params["skip"]:
                raise
            rows.append(_error_row(vid, path, str(e)))
            continue
        if params["encoder"] == "frames":
            cache.put(h, frames)
        rows.append({**_clip_row(vid, path, frames, False), "content_hash": h})
    return _table(rows)


def _clip_row(vid: str, path: str, arr: np.ndarray, hit: bool) -> dict[str, Any]:
    return {"video_id": vid, "path": path, "data": arr.tobytes(), "shape": list(arr.shape), "dtype": str(arr.dtype),
            "reason": "", "error": "", "cache_hit": hit}

def _table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = ["video_id", "path", "data", "shape", "dtype", "reason", "error", "cache_hit", "content_hash"]
    types = [pa.string(), pa.string(), pa.binary(), pa.list_(pa.int32()), pa.string(), pa.string(), pa.string(),
             pa.bool_(), pa.string()]
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


def load_feature_files(batch: dict[str, np.ndarray], skip: bool) -> pa.Table:
    """map_batches UDF over feature files: .npy (one video) or Parquet (video_id, features)."""
    rows = []
    for path in batch["path"]:
        fs, p = fsspec.core.url_to_fs(path)
        try:
            with fs.open(p, "rb") as f:
                raw = f.read()
            if path.endswith(".npy"):
                items = [(os.path.basename(path).split(".")[0], np.load(io.BytesIO(raw), allow_pickle=False))]
            else:
                table = pq.read_table(io.BytesIO(raw))
                if not {"video_id", "features"} <= set(table.column_names):
                    raise DataError(f"{path}: feature Parquet needs columns video_id and features; it has {table.column_names}")
                items = [(str(v), np.asarray([np.asarray(x, dtype=np.float32) for x in f]))
                         for v, f in zip(table.column("video_id").to_pylist(), table.column("features").to_pylist())]
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            err = DataError(f"{path}: cannot read features ({type(e).__name__}: {e})")
            if not skip:
                raise err from e
            rows.append(_error_row(os.path.basename(path).split(".")[0], path, str(err)))
            continue
        for vid, arr in items:
            if arr.ndim != 2 or not arr.size or not np.isfinite(arr).all():
                err = DataError(f"{path}: features of '{vid}' must be a finite (frames, dims) array, got shape {arr.shape}")
                if not skip:
                    raise err
                rows.append(_error_row(vid, path, str(err)))
                continue
            rows.append(_clip_row(vid, path, arr.astype(np.float16), False))
    return _table(rows)


def attach_captions(batch: dict[str, np.ndarray], meta: dict[str, Any]) -> pa.Table:
    """Join the decoded rows with split, id and encoded captions (a dict shipped with the task)."""
    out: dict[str, list] = {k: [] for k in ("id", "video_id", "split", "path", "data", "shape", "dtype", "src_len",
                                            "captions", "caption_ids", "reason", "error", "cache_hit", "n_captions")}
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
    return pa.table({
        "id": pa.array(out["id"], pa.int64()), "video_id": pa.array(out["video_id"], pa.string()),
        "split": pa.array(out["split"], pa.string()), "path": pa.array(out["path"], pa.string()),
        "data": pa.array(out["data"], pa.binary()), "shape": pa.array(out["shape"], pa.list_(pa.int32())),
        "dtype": pa.array(out["dtype"], pa.string()), "src_len": pa.array(out["src_len"], pa.int32()),
        "captions": pa.array(out["captions"], pa.list_(pa.string())),
        "caption_ids": pa.array(out["caption_ids"], pa.list_(pa.list_(pa.int32()))),
        "reason": pa.array(out["reason"], pa.string()), "error": pa.array(out["error"], pa.string()),
        "cache_hit": pa.array(out["cache_hit"], pa.bool_()), "n_captions": pa.array(out["n_captions"], pa.int32()),
    })


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
