"""Ray Data preprocessing of a video-caption corpus into training-ready Parquet shards.

list clips and captions (driver: annotation files are small) -> clean captions, train the
caption tokenizer on the training split, encode, filter by length -> Ray Data: read clip
bytes, decode + sample frames with PyAV in ``map_batches`` (or load precomputed features),
frozen backbone on an actor pool when asked, feature cache -> one row per video with all of
its encoded captions -> ``{train,val,test}/*.parquet`` + ``manifest.json``.

Counts: captions are the rows (read = kept + dropped, per reason and split); videos are
counted the same way under ``videos``, and the cache's hits and misses under ``cache``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import fsspec
import ray

from ..config import DataConfig, config_hash
from ..tracking import redact  # printed lines and the manifest: paths may be URIs with credentials
from . import tokenizer as toklib
from .preprocess import SPLITS, output_dir, read_manifest, tokenizer_info, write_manifest, write_tokenizers
from .readers import DataError, absolute
from .video import (FrozenBackbone, attach_captions, decode_clips, encoder_key, list_corpus, load_feature_files,
                    sampling_key)

VIDEO_COLUMNS = ["id", "video_id", "path", "data", "shape", "dtype", "src_len", "captions", "caption_ids"]
MAX_ERRORS_KEPT = 20  # error messages of dropped clips kept in the manifest


def ensure_demo_video(cfg: DataConfig) -> None:
    """data=demo_video: generate the embedded corpus (real mp4 clips) under data.root once."""
    if cfg.name != "demo_video":
        return
    fs, root = fsspec.core.url_to_fs(absolute(cfg.root))
    if fs.exists(f"{root}/train_val_videodatainfo.json"):
        return
    from .synthetic_video import write_demo_video

    n_eval = max(50, cfg.demo_size // 12)
    print(f"[preprocess] generating the demo video corpus ({cfg.demo_size} training clips) in {redact(cfg.root)}", flush=True)
    write_demo_video(absolute(cfg.root), n_train=cfg.demo_size, n_val=n_eval, n_test=n_eval, seed=1234)


def _fingerprint(cfg: DataConfig, corpus: dict[str, Any]) -> list[dict[str, Any]]:
    """Sizes and mtimes of the annotation file and every clip (one stat per file)."""
    out = []
    for path in sorted(set(corpus["sources"].values())) + ([absolute(cfg.captions_file)] if cfg.captions_file else []):
        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
        out.append({"path": path, "size": info.get("size"), "mtime": str(info.get("mtime") or info.get("LastModified") or "")})
    if not cfg.captions_file and cfg.name != "video_features":
        for name in ("train_val_videodatainfo.json", "captions.txt"):
            fs, p = fsspec.core.url_to_fs(f"{absolute(cfg.root).rstrip('/')}/{name}")
            if fs.exists(p):
                out.append({"path": name, "size": fs.info(p).get("size"), "mtime": str(fs.info(p).get("mtime"))})
    return out


def _encode_captions(cfg: DataConfig, corpus: dict[str, Any], dropped: dict[str, dict[str, int]]) -> tuple[str, dict]:
    """Clean, filter, train the tokenizer on the training captions, encode.

    Returns (tokenizer JSON, {video_id: {id, split, captions, caption_ids}}) for videos
    with at least one kept caption; ``dropped[split][reason]`` counts captions.
    """
    def drop(split: str, reason: str, n: int = 1) -> None:
        dropped[split][reason] = dropped[split].get(reason, 0) + n

    cleaned: dict[str, list[str]] = {}
    for vid, caps in corpus["captions"].items():
        split = corpus["splits"][vid]
        for cap in caps:
            text = toklib.clean_text(cap, cfg.normalization, cfg.lowercase)
            if not text:
                drop(split, "empty")
            elif len(text) > cfg.max_chars:
                drop(split, "too_long_chars")
            else:
                cleaned.setdefault(vid, []).append(text)
    train_text = [c for vid, caps in cleaned.items() if corpus["splits"][vid] == "train" for c in caps]
    if not train_text:
        raise DataError(f"no usable training captions in {cfg.root or cfg.captions_file}: no video of the train split "
                        "has a clip and a caption that passes the filters")
    tok = toklib.train_tokenizer(train_text[: cfg.tokenizer_max_lines], cfg.tokenizer, cfg.vocab_size)
    meta: dict[str, Any] = {}
    for n, vid in enumerate(sorted(cleaned)):
        split = corpus["splits"][vid]
        keep, ids = [], []
        for text, enc in zip(cleaned[vid], toklib.encode(tok, cleaned[vid])):
            if len(enc) > cfg.max_tokens:
                drop(split, "too_long_tokens")
            elif len(enc) < cfg.min_tokens:
                drop(split, "too_short_tokens")
            else:
                keep.append(text)
                ids.append(enc)
        if keep:
            meta[vid] = {"id": n, "split": split, "captions": keep, "caption_ids": ids}
    return tok.to_str(), meta


def _clips_dataset(cfg: DataConfig, corpus: dict[str, Any], meta: dict[str, Any]) -> "ray.data.Dataset":
    skip = cfg.on_bad_rows == "skip"
    if cfg.name == "video_features":
        files = sorted(set(corpus["sources"].values()))
        return ray.data.from_items([{"path": p} for p in files], override_num_blocks=min(len(files), 64)).map_batches(
            load_feature_files, fn_kwargs={"skip": skip}, batch_size=1, batch_format="numpy")
    paths = [corpus["sources"][vid] for vid in sorted(meta)]
    params = {"num_frames": cfg.num_frames, "frame_size": cfg.frame_size, "fps": cfg.fps, "skip": skip,
              "cache_root": cfg.feature_cache, "encoder": encoder_key(cfg), "sampling": sampling_key(cfg)}
    ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=0.25, override_num_blocks=min(len(paths), 200))
    ds = ds.map_batches(decode_clips, fn_kwargs={"params": params}, batch_size=8, batch_format="numpy")
    if cfg.frame_encoder == "frozen":
        gpus = ray.cluster_resources().get("GPU", 0)
        n = max(1, min(4, int(gpus) or int(ray.cluster_resources().get("CPU", 1))))
        ds = ds.map_batches(FrozenBackbone, fn_constructor_args=(cfg.backbone, params["cache_root"], params["encoder"],
                                                                 params["sampling"]),
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n), num_gpus=1 if gpus else 0,
                            batch_size=16, batch_format="numpy")
    return ds


def preprocess_video(cfg: DataConfig, force: bool = False) -> tuple[str, dict[str, Any]]:
    t0 = time.time()
    ensure_demo_video(cfg)
    corpus = list_corpus(cfg)
    out = output_dir(cfg, _fingerprint(cfg, corpus))
    manifest = None if force else read_manifest(out)
    if manifest is not None:
        print(f"[preprocess] reusing {redact(out)} ({manifest['videos']['kept']} videos, {manifest['rows_kept']} captions)",
              flush=True)
        return out, manifest
    n_videos = len(corpus["splits"])
    print(f"[preprocess] {n_videos} videos, {corpus['captions_read']} captions -> {redact(out)}", flush=True)
    dropped: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    dropped["train"].update(corpus["dropped"])  # captions not tied to a split (unknown videos, bad lines)
    tok_json, meta = _encode_captions(cfg, corpus, dropped)
    vdropped: dict[str, int] = {}
    if corpus["missing_videos"]:
        vdropped["missing_video"] = len(corpus["missing_videos"])
    no_caps = [v for v in corpus["splits"] if v not in meta and v not in corpus["missing_videos"]]
    if no_caps:
        vdropped["no_captions"] = len(no_caps)

    print(f"[preprocess] decoding {len(meta)} clips ({cfg.num_frames} frames at {cfg.frame_size}px, "
          f"encoder {cfg.frame_encoder}) on Ray Data", flush=True)
    rows = _clips_dataset(cfg, corpus, meta).map_batches(
        attach_captions, fn_kwargs={"meta": meta}, batch_size=64, batch_format="numpy").materialize()
    stats = rows.select_columns(["video_id", "split", "reason", "error", "cache_hit", "n_captions"]).take_all()
    seen = {r["video_id"] for r in stats}
    errors = [r["error"] for r in stats if r["reason"] == "bad_video"][:MAX_ERRORS_KEPT]
    kept_caps = {s: 0 for s in SPLITS}
    kept_videos = {s: 0 for s in SPLITS}
    for r in stats:
        if r["reason"]:
            vdropped[r["reason"]] = vdropped.get(r["reason"], 0) + 1
            if r["split"]:
                dropped[r["split"]][r["reason"]] = dropped[r["split"]].get(r["reason"], 0) + int(r["n_captions"])
        else:
            kept_caps[r["split"]] += int(r["n_captions"])
            kept_videos[r["split"]] += 1
    unseen = sorted(set(meta) - seen)  # Parquet features that never named a captioned video
    if unseen:
        if cfg.on_bad_rows != "skip":
            raise DataError(f"{len(unseen)} captioned video(s) have no features in data.files, e.g. '{unseen[0]}'")
        vdropped["missing_video"] = vdropped.get("missing_video", 0) + len(unseen)
        for vid in unseen:
            m = meta[vid]
            dropped[m["split"]]["missing_video"] = dropped[m["split"]].get("missing_video", 0) + len(m["captions"])

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    from ray.data.expressions import col

    for split in SPLITS:
        if kept_videos[split]:
            (rows.filter(expr=(col("reason") == "") & (col("split") == split)).select_columns(VIDEO_COLUMNS)
             .write_parquet(f"{out}/{split}"))
    write_tokenizers(out, tok_json, tok_json)
    first = next((r for r in rows.filter(expr=col("reason") == "").select_columns(["shape", "dtype"]).take(1)), None)
    if first is None:
        raise DataError(f"no clip of {cfg.root or cfg.files} could be used ({vdropped}); first errors: {errors[:3]}")
    dropped_all: dict[str, int] = {}
    for per in dropped.values():
        for reason, n in per.items():
            dropped_all[reason] = dropped_all.get(reason, 0) + n
    hits = sum(1 for r in stats if r["cache_hit"])
    manifest = {
        "format": 1,
        "task": "video",
        "data_config": {k: redact(v) for k, v in asdict(cfg).items()},  # a record, on shared storage
        "config_hash": config_hash(asdict(cfg)),
        "rows_read": corpus["captions_read"],
        "rows_kept": sum(kept_caps.values()),
        "dropped": dropped_all,
        "splits": {s: {"kept": kept_caps[s], "videos": kept_videos[s], "dropped": dropped[s]} for s in SPLITS},
        "videos": {"read": n_videos + len([v for v in seen if v not in corpus["splits"]]),
                   "kept": sum(kept_videos.values()), "dropped": vdropped, "errors": errors},
        "cache": {"hits": hits, "misses": len(stats) - hits, "dir": redact(cfg.feature_cache)},
        "video": {"kind": "frames" if first["dtype"] == "uint8" else "features",
                  "shape": [int(x) for x in first["shape"]], "num_frames": cfg.num_frames, "fps": cfg.fps,
                  "frame_size": cfg.frame_size, "encoder": cfg.frame_encoder,
                  "feature_dim": int(first["shape"][-1]) if first["dtype"] != "uint8" else 0},
        "tokenizer": tokenizer_info(cfg, tok_json, tok_json),
        "seconds": round(time.time() - t0, 2),
    }
    if manifest["rows_read"] != manifest["rows_kept"] + sum(dropped_all.values()):
        raise AssertionError(f"caption counts do not add up: {manifest['rows_read']} read != "
                             f"{manifest['rows_kept']} kept + {dropped_all}")
    print(f"[preprocess] videos: {manifest['videos']['kept']} kept, dropped {vdropped or 0}; cache hits {hits}/"
          f"{len(stats)}", flush=True)
    return out, write_manifest(out, manifest)
