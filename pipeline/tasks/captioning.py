"""Captioning: video clips (MSR-VTT, MSVD, frame features) with captions -> a captioner.

The encoder's input is the clip (frames through a small CNN, or precomputed features);
every (clip, caption) pair is a training example, and a batch encodes each clip once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..data.output import Preprocessed
from ..data.tokenizer import Vocab
from ..train.batching import Batch, collate
from .base import Task


class CaptioningTask(Task):
    name = "captioning"
    metric = "val_cider"
    val_scores = ("cider", "bleu4", "rouge_l")
    eval_columns = ("id", "video_id", "data", "shape", "dtype", "captions", "caption_ids")
    test_columns = ("id", "video_id", "data", "shape", "dtype", "captions")
    test_batch_size = 64
    unit = "videos"
    digits = 4

    def preprocess(self, data_cfg: Any, force: bool = False) -> Preprocessed:
        from ..data.video_preprocess import preprocess_video

        return preprocess_video(data_cfg, force)

    def check_inputs(self, data_cfg: Any) -> str:
        from ..data.video import list_corpus

        corpus = list_corpus(data_cfg)
        return f"{len(corpus['splits'])} videos, {corpus['captions_read']} captions listed"

    def model_input(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"video": {k: manifest["video"][k] for k in ("kind", "shape", "feature_dim")}}

    def model_input_of(self, vocab: Vocab) -> dict[str, Any] | None:
        return vocab.video  # frames through the CNN, or features through a projection

    def target_tokens(self, data_dir: str) -> int:
        import pyarrow.compute as pc

        from ..data.output import read_column

        captions = pc.list_flatten(read_column(f"{data_dir}/train", "caption_ids"))  # one entry per caption
        return int(pc.sum(pc.list_value_length(captions)).as_py() or 0) + len(captions)

    def split_rows(self, split: dict[str, Any]) -> int:
        return split["videos"]  # a row is a video with all its captions

    def usage(self, bundle: str) -> str:
        return f"pipeline caption --model {bundle} CLIP.mp4 ..."

    def data_metrics(self, manifest: dict[str, Any]) -> dict[str, float]:
        return {
            **super().data_metrics(manifest),
            "data_videos_read": manifest["videos"]["read"],
            "data_videos_kept": manifest["videos"]["kept"],
            "data_cache_hits": manifest["cache"]["hits"],
            **{f"data_videos_dropped_{k}": v for k, v in manifest["videos"]["dropped"].items()},
        }

    def rows_per_read(self, mega_rows: int) -> int:
        return max(16, mega_rows // 8)  # a video row holds all its captions

    def batches(self, mega_batches, batch_tokens, specials, rng, pin, skip):
        return caption_batches(mega_batches, batch_tokens, *specials, rng, pin=pin, skip=skip)

    def blank_batch(self, vocab: Vocab) -> Batch:
        video = vocab.video
        blank = np.zeros(video["shape"], dtype=np.uint8 if video["kind"] == "frames" else np.float16)
        return collate_clips([blank], [np.array([vocab.eos_id])], [-1], *vocab.specials)

    def eval_rows(self, model, rows, beam_size, length_penalty, device, with_loss):
        from ..inference import decode_clip_ids

        mb = {k: np.asarray(v, dtype=object) if k != "id" else np.asarray(v) for k, v in rows.items()}
        specials = (model.pad_id, model.bos_id, model.eos_id)
        batches = caption_batches(iter([mb]), 2000, *specials) if with_loss else None
        hyp_ids = decode_clip_ids(model, caption_pairs(mb)[0], beam_size, length_penalty, 64, device)
        refs = [list(c) for c in rows["captions"]]
        return {"id": rows["id"], "src": rows["video_id"], "ref": refs, "hyp_ids": hyp_ids, "batches": batches}

    def scores(self, hyp: list[str], ref: list[Any], final: bool = False) -> dict[str, float]:
        from .. import metrics

        return metrics.caption_scores(hyp, ref, with_meteor=final)

    def decoder(self) -> type:
        return CaptionBatch

    def decoded(self, out: dict[str, list]) -> dict[str, list]:
        return {**out, "tgt": [json.loads(refs) for refs in out["tgt"]]}

    def sample_table(self, res: dict[str, list], picks: list[int]) -> tuple[dict[str, list], str]:
        table = {
            "video_id": [res["src"][i] for i in picks],
            "references": [" | ".join(res["tgt"][i]) for i in picks],
            "caption": [res["hyp"][i] for i in picks],
        }
        return table, "samples/test_captions.json"

    def log_samples(self, log: Any, data_dir: str, res: dict[str, list], picks: list[int]) -> None:
        log_contact_sheet(log, data_dir, [res["src"][i] for i in picks], res, picks)

    def model_example(self, cfg: Any, data_dir: str, res: dict[str, list]) -> list[str]:
        """One test clip file (a captioner's input is a clip file's path); none for a model on
        frozen-backbone features (predicting needs the backbone file)."""
        from ..data.output import read_column

        if not res.get("src") or cfg.data.frame_encoder == "frozen":
            return []
        paths = read_column(f"{data_dir}/test", "path")
        return [paths[0].as_py()] if len(paths) else []

    def is_captioning(self) -> bool:
        return True


class CaptionBatch:
    """Ray Data actor: caption stored clips (frames or features) with a video bundle."""

    def __init__(self, bundle: str, beam_size: int, length_penalty: float):
        from ..inference import Captioner

        self.cap = Captioner.load(bundle, "cuda" if torch.cuda.is_available() else "cpu")
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data.video import clip_array

        clips = [clip_array(d, s, t) for d, s, t in zip(batch["data"], batch["shape"], batch["dtype"])]
        hyps = self.cap.caption(clips, self.beam_size, self.length_penalty)
        refs = [json.dumps([str(c) for c in caps]) for caps in batch["captions"]]  # a string column, not ragged lists
        return {
            "id": batch["id"],
            "src": batch["video_id"],
            "tgt": np.array(refs, dtype=object),
            "hyp": np.array(hyps, dtype=object),
        }


def collate_clips(
    clips: Sequence[np.ndarray],
    tgt_ids: Sequence[np.ndarray],
    ids: Sequence[int],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    pin: bool = False,
    src_index: Sequence[int] | None = None,
) -> Batch:
    """Video: distinct clips (K_i, ...) (frames uint8 or features float16) padded to
    (V, K, ...), targets as in :func:`collate`; ``src_index`` gives each target's clip
    (default: target i belongs to clip i)."""
    from ..data.video import pad_clips

    src, lens = pad_clips(list(clips))
    text = collate([np.zeros(1, dtype=np.int64)] * len(tgt_ids), tgt_ids, ids, pad_id, bos_id, eos_id)
    src_t = torch.from_numpy(src)
    index = torch.as_tensor(np.asarray(src_index, dtype=np.int64)) if src_index is not None else None
    if pin:
        src_t, text.tgt_in, text.tgt_out = src_t.pin_memory(), text.tgt_in.pin_memory(), text.tgt_out.pin_memory()
    return Batch(
        src_t,
        torch.from_numpy(lens),
        text.tgt_in,
        text.tgt_out,
        text.ids,
        text.real_tokens,
        text.padded_tokens,
        index,
        real_index=text.real_index,  # the real targets' positions, found on the host (no device sync)
    )


def caption_pairs(mb: dict[str, np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray]:
    """A mega-batch of video rows -> (clips, clip index per pair, caption ids per pair, pair ids).
    Every (video, caption) pair is one training example; pair id = video id * 1024 + caption index."""
    from ..data.video import clip_array

    clips = [clip_array(d, s, t) for d, s, t in zip(mb["data"], mb["shape"], mb["dtype"])]
    which, tgts, ids = [], [], []
    for i, caps in enumerate(mb["caption_ids"]):
        for j, cap in enumerate(caps):
            which.append(i)
            tgts.append(np.asarray(cap, dtype=np.int64))
            ids.append(int(mb["id"][i]) * 1024 + j)
    return clips, np.asarray(which, dtype=np.int64), tgts, np.asarray(ids, dtype=np.int64)


def caption_batches(
    mega_batches: Iterator[dict[str, np.ndarray]],
    batch_tokens: int,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    rng: np.random.Generator | None = None,
    pin: bool = False,
    skip: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Mega-batches of video rows -> Batches of whole videos with all their captions.

    A clip is encoded once per batch however many captions it has (the encoder, a CNN
    over every frame, is most of a step's cost); videos are added, in shuffled order,
    while the padded target size stays within ``batch_tokens``.
    """
    for mb in mega_batches:
        clips, which, tgts, ids = caption_pairs(mb)
        if skip is not None and len(skip):  # pairs trained on before a resume
            keep = np.nonzero(~np.isin(ids, skip))[0]
            which, tgts, ids = which[keep], [tgts[i] for i in keep], ids[keep]
        pairs_of = [np.nonzero(which == v)[0] for v in range(len(clips))]
        order = rng.permutation(len(clips)) if rng is not None else np.arange(len(clips))
        group: list[int] = []
        longest = 0
        for v in [v for v in order if len(pairs_of[v])] + [None]:
            if v is not None:
                width = max((len(tgts[i]) + 1 for i in pairs_of[v]), default=1)
                n_pairs = sum(len(pairs_of[g]) for g in group) + len(pairs_of[v])
                if not group or max(longest, width) * n_pairs <= batch_tokens:
                    group.append(v)
                    longest = max(longest, width)
                    continue
            if group:
                pairs = np.concatenate([pairs_of[g] for g in group])
                local = {g: r for r, g in enumerate(group)}
                yield collate_clips(
                    [clips[g] for g in group],
                    [tgts[i] for i in pairs],
                    ids[pairs],
                    pad_id,
                    bos_id,
                    eos_id,
                    pin,
                    [local[which[i]] for i in pairs],
                )
            if v is not None:
                group, longest = [v], max((len(tgts[i]) + 1 for i in pairs_of[v]), default=1)


def log_contact_sheet(log: Any, data_dir: str, video_ids: list[str], res: dict[str, list], picks: list[int]) -> None:
    """A PNG of a few test clips (frames in a row) with predicted and reference captions."""
    import os
    import tempfile

    import fsspec

    from ..data.output import read_split
    from ..data.video import clip_array, decode_clip
    from ..report import contact_sheet

    table = read_split(
        f"{data_dir}/test",
        ["video_id", "path", "data", "shape", "dtype"],
        filters=[("video_id", "in", list(video_ids))],
    )
    rows = {r["video_id"]: r for r in table.to_pylist()}
    items = []
    for vid, i in zip(video_ids, picks):
        r = rows[vid]
        if r["dtype"] == "uint8":
            frames = clip_array(r["data"], r["shape"], r["dtype"])
        else:  # features: show the clip itself when its file is a video
            try:
                with fsspec.open(r["path"], "rb") as f:
                    frames = decode_clip(f.read(), 6, 96, 0.0, r["path"])
            except Exception:
                frames = None
        items.append({"video_id": vid, "frames": frames, "hyp": res["hyp"][i], "refs": res["tgt"][i]})
    with tempfile.TemporaryDirectory(prefix="pipeline-sheet-") as tmp:  # the logger keeps its own copy
        path = os.path.join(tmp, "test_contact_sheet.png")
        contact_sheet(items, path)
        log.log_artifact(path, "samples")
