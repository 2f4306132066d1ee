"""Ray Data preprocessing of a video-caption corpus into training-ready Parquet shards.

list clips and captions (driver: annotation files are small) -> clean captions, train the
caption tokenizer on the training split, encode, filter by length -> Ray Data: read clip
bytes, decode + sample frames with PyAV in ``map_batches`` (or load precomputed features),
frozen backbone on an actor pool when asked, feature cache -> one row per video with all of
its encoded captions -> ``{train,val,test}/*.parquet`` + ``manifest.json``, in one streaming
pass: a sink writes each block's kept videos and returns the counts, so no decoded clip waits
in the object store. Built in a staging folder and published whole, as text (``output.py``).

Counts: captions are the rows (read = kept + dropped, per reason and split); videos are
counted the same way under ``videos``, and the cache's hits and misses under ``cache``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import fsspec
import ray

from ..config import DataConfig, config_hash
from ..tracking import redact  # printed lines and the manifest: paths may be URIs with credentials
from . import tokenizer as toklib
from .output import (
    SPLITS,
    Preprocessed,
    SplitSink,
    check_manifest,
    demo_folder,
    output_dir,
    report_done,
    reuse_or_build,
    tokenizer_info,
    write_split_shards,
    write_tokenizers,
)
from .readers import DataError, absolute
from .video import (
    FrozenBackbone,
    attach_captions,
    decode_clips,
    encoder_key,
    list_corpus,
    load_feature_files,
    sampling_key,
)

VIDEO_COLUMNS = ["id", "video_id", "path", "data", "shape", "dtype", "src_len", "captions", "caption_ids"]
MAX_ERRORS_KEPT = 20  # error messages of dropped clips kept in the manifest


def ensure_demo_video(cfg: DataConfig) -> None:
    """data=demo_video: generate the embedded corpus (real mp4 clips) under data.root once,
    into a folder the generator owns: never over a user's clips or next to their captions."""
    if cfg.name != "demo_video":
        return
    root = absolute(cfg.root)
    fs, p = fsspec.core.url_to_fs(root)
    refuse = ""
    if cfg.captions_file or cfg.videos_dir:
        refuse = (
            f"data.{'captions_file' if cfg.captions_file else 'videos_dir'} is set, so this is a corpus of "
            "your own: use data=msrvtt (or msvd, video_features) for it"
        )

    n_eval = max(50, cfg.demo_size // 12)
    params = {"train_clips": cfg.demo_size, "eval_clips": n_eval, "seed": 1234}

    def generate() -> None:
        from .synthetic_video import write_demo_video

        print(
            f"[preprocess] generating the demo video corpus ({cfg.demo_size} training clips) in {redact(cfg.root)}",
            flush=True,
        )
        write_demo_video(root, n_train=cfg.demo_size, n_val=n_eval, n_test=n_eval, seed=1234)

    # The annotation file is written after every clip: with it there, the corpus is whole.
    demo_folder(
        root, lambda: fs.exists(f"{p}/train_val_videodatainfo.json"), generate, "data=demo_video", params, refuse
    )


def _fingerprint(cfg: DataConfig, corpus: dict[str, Any]) -> list[dict[str, Any]]:
    """Sizes and mtimes of the annotation file and every clip (one stat per file)."""
    out = []
    for path in sorted(set(corpus["sources"].values())) + ([absolute(cfg.captions_file)] if cfg.captions_file else []):
        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
        out.append(
            {"path": path, "size": info.get("size"), "mtime": str(info.get("mtime") or info.get("LastModified") or "")}
        )
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
        raise DataError(
            f"no usable training captions in {cfg.root or cfg.captions_file}: no video of the train split "
            "has a clip and a caption that passes the filters"
        )
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


def _clips_dataset(cfg: DataConfig, corpus: dict[str, Any], meta: dict[str, Any]) -> ray.data.Dataset:
    skip = cfg.on_bad_rows == "skip"
    if cfg.name == "video_features":
        wanted = {vid: corpus["source_rows"][vid] for vid in meta}
        files = sorted({w.split("#", 1)[0] for w in wanted.values()})
        return ray.data.from_items([{"path": p} for p in files], override_num_blocks=min(len(files), 64)).map_batches(
            load_feature_files, fn_kwargs={"skip": skip, "wanted": wanted}, batch_size=1, batch_format="numpy"
        )
    paths = [corpus["sources"][vid] for vid in sorted(meta)]
    params = {
        "num_frames": cfg.num_frames,
        "frame_size": cfg.frame_size,
        "fps": cfg.fps,
        "skip": skip,
        "cache_root": cfg.feature_cache,
        "encoder": encoder_key(cfg),
        "sampling": sampling_key(cfg),
    }
    ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=0.25, override_num_blocks=min(len(paths), 200))
    ds = ds.map_batches(decode_clips, fn_kwargs={"params": params}, batch_size=8, batch_format="numpy")
    if cfg.frame_encoder == "frozen":
        gpus = ray.cluster_resources().get("GPU", 0)
        n = max(1, min(4, int(gpus) or int(ray.cluster_resources().get("CPU", 1))))
        ds = ds.map_batches(
            FrozenBackbone,
            fn_constructor_args=(cfg.backbone, params["cache_root"], params["encoder"], params["sampling"]),
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n),
            num_gpus=1 if gpus else 0,
            batch_size=16,
            batch_format="numpy",
        )
    return ds


def _empty_counts() -> dict[str, Any]:
    """What a VideoSink write returns, before any row: counts per (split, reason), cache hits,
    error messages (the first few), the ids seen and one kept row's shape."""
    return {
        "videos": Counter(),
        "captions": Counter(),
        "hits": 0,
        "rows": 0,
        "errors": [],
        "cache_errors": [],
        "n_cache_errors": 0,
        "seen": [],
        "first": None,
    }


class VideoSink(SplitSink):
    """The video rows' writer: each block's kept videos to ``{out}/{split}/`` (as the text sink
    does), returning what the manifest needs: videos and captions per (split, reason), cache
    hits and read errors, the first error messages, the ids seen and one kept row's shape."""

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        res = _empty_counts()
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if not table.num_rows:
                continue
            stats = table.select(
                ["video_id", "split", "reason", "error", "cache_hit", "n_captions", "cache_error", "shape", "dtype"]
            ).to_pylist()
            for r in stats:
                key = (r["split"], r["reason"] or "kept")
                res["videos"][key] += 1
                res["captions"][key] += int(r["n_captions"])
                res["hits"] += bool(r["cache_hit"])
                res["rows"] += 1
                res["seen"].append(r["video_id"])
                if r["reason"] and len(res["errors"]) < MAX_ERRORS_KEPT:
                    res["errors"].append(r["error"])
                if r["cache_error"]:
                    res["n_cache_errors"] += 1
                    if len(res["cache_errors"]) < MAX_ERRORS_KEPT:
                        res["cache_errors"].append(r["cache_error"])
                if not r["reason"] and res["first"] is None:
                    res["first"] = {"shape": [int(x) for x in r["shape"]], "dtype": r["dtype"]}
            write_split_shards(self.out, table, VIDEO_COLUMNS)
        return res

    def on_write_complete(self, write_result: Any) -> None:
        total = _empty_counts()
        for r in write_result.write_returns:
            for k in ("videos", "captions", "hits", "rows", "n_cache_errors", "errors", "cache_errors", "seen"):
                total[k] += r[k]  # Counters add, numbers sum, lists concatenate
            total["first"] = total["first"] or r["first"]
        total["errors"], total["cache_errors"] = (
            total["errors"][:MAX_ERRORS_KEPT],
            total["cache_errors"][:MAX_ERRORS_KEPT],
        )
        self.result = total


def preprocess_video(cfg: DataConfig, force: bool = False) -> Preprocessed:
    t0 = time.time()
    ensure_demo_video(cfg)
    corpus = list_corpus(cfg)
    out = output_dir(cfg, _fingerprint(cfg, corpus))
    manifest, built = reuse_or_build(out, force, lambda staging: _build(cfg, corpus, staging, t0))
    if built:
        report_done(out, manifest)
    else:
        print(
            f"[preprocess] reusing {redact(out)} ({manifest['videos']['kept']} videos, {manifest['rows_kept']} captions)",
            flush=True,
        )
    return Preprocessed(out, manifest)


def _build(cfg: DataConfig, corpus: dict[str, Any], out: str, t0: float) -> dict[str, Any]:
    """Decode and write the videos under ``out`` (a staging folder) in one streaming pass;
    returns the manifest."""
    n_videos = len(corpus["splits"])
    print(f"[preprocess] {n_videos} videos, {corpus['captions_read']} captions -> {redact(out)}", flush=True)
    dropped: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    dropped["train"].update(corpus["dropped"])  # captions not tied to a split (unknown videos, bad lines)
    tok_json, meta = _encode_captions(cfg, corpus, dropped)
    vdropped: dict[str, int] = dict(corpus["videos_dropped"])
    no_caps = [v for v in corpus["splits"] if v not in meta and v not in corpus["missing_videos"]]
    if no_caps:
        vdropped["no_captions"] = len(no_caps)

    print(
        f"[preprocess] decoding {len(meta)} clips ({cfg.num_frames} frames at {cfg.frame_size}px, "
        f"encoder {cfg.frame_encoder}) on Ray Data",
        flush=True,
    )
    sink = VideoSink(out)
    (
        _clips_dataset(cfg, corpus, meta)
        .map_batches(attach_captions, fn_kwargs={"meta": meta}, batch_size=64, batch_format="numpy")
        .write_datasink(sink)
    )
    res = sink.result
    errors = (corpus["errors"] + res["errors"])[:MAX_ERRORS_KEPT]
    kept_caps = dict.fromkeys(SPLITS, 0)
    kept_videos = dict.fromkeys(SPLITS, 0)
    for (split, reason), n in res["videos"].items():
        if reason == "kept":
            kept_videos[split] += n
            kept_caps[split] += res["captions"][split, reason]
        else:
            vdropped[reason] = vdropped.get(reason, 0) + n
            if split:
                dropped[split][reason] = dropped[split].get(reason, 0) + res["captions"][split, reason]
    seen = set(res["seen"])
    if len(seen) != len(res["seen"]):  # ids are unique by list_corpus; a repeat here would be kept twice
        raise AssertionError(f"a video id came through the pipeline twice ({len(res['seen'])} rows, {len(seen)} ids)")
    unseen = sorted(set(meta) - seen)
    if unseen:
        raise AssertionError(f"{len(unseen)} captioned video(s) never came through the pipeline, e.g. '{unseen[0]}'")
    write_tokenizers(out, tok_json, tok_json)
    first = res["first"]
    if first is None:
        raise DataError(f"no clip of {cfg.root or cfg.files} could be used ({vdropped}); first errors: {errors[:3]}")
    dropped_all: dict[str, int] = {}
    for per in dropped.values():
        for reason, n in per.items():
            dropped_all[reason] = dropped_all.get(reason, 0) + n
    manifest = {
        "format": 1,
        "task": "video",
        "data_config": {k: redact(v) for k, v in asdict(cfg).items()},  # a record, on shared storage
        "config_hash": config_hash(asdict(cfg)),
        "rows_read": corpus["captions_read"],
        "rows_kept": sum(kept_caps.values()),
        "dropped": dropped_all,
        "splits": {s: {"kept": kept_caps[s], "videos": kept_videos[s], "dropped": dropped[s]} for s in SPLITS},
        "videos": {
            "read": corpus["videos_read"],
            "kept": sum(kept_videos.values()),
            "dropped": vdropped,
            "errors": errors,
        },
        # A cache entry that cannot be read is recomputed (the cache is derived data: the clip
        # is fine) and rewritten; counted here, with the first entries named.
        "cache": {
            "hits": res["hits"],
            "misses": res["rows"] - res["hits"],
            "dir": redact(cfg.feature_cache),
            **({"errors": res["n_cache_errors"], "error_files": res["cache_errors"]} if res["n_cache_errors"] else {}),
        },
        "video": {
            "kind": "frames" if first["dtype"] == "uint8" else "features",
            "shape": first["shape"],
            "num_frames": cfg.num_frames,
            "fps": cfg.fps,
            "frame_size": cfg.frame_size,
            "encoder": cfg.frame_encoder,
            "feature_dim": int(first["shape"][-1]) if first["dtype"] != "uint8" else 0,
        },
        "tokenizer": tokenizer_info(cfg, tok_json, tok_json),
        "seconds": round(time.time() - t0, 2),
    }
    if manifest["rows_read"] != manifest["rows_kept"] + sum(dropped_all.values()):
        raise AssertionError(
            f"caption counts do not add up: {manifest['rows_read']} read != "
            f"{manifest['rows_kept']} kept + {dropped_all}"
        )
    if manifest["videos"]["read"] != manifest["videos"]["kept"] + sum(vdropped.values()):
        raise AssertionError(
            f"video counts do not add up: {manifest['videos']['read']} read != "
            f"{manifest['videos']['kept']} kept + {vdropped}"
        )
    print(
        f"[preprocess] videos: {manifest['videos']['kept']} kept, dropped {vdropped or 0}; cache hits {res['hits']}/"
        f"{res['rows']}",
        flush=True,
    )
    return check_manifest(manifest)
