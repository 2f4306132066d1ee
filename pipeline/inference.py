"""Using a trained model: the model bundle on disk, batched decoding, text in and out.

A *bundle* is a folder (local or URI) with ``model.pt`` (a state dict, loaded with
``weights_only=True``), ``model.json`` (model config, vocabulary sizes, special ids,
text cleaning) and ``src_tokenizer.json`` / ``tgt_tokenizer.json``. The best checkpoint
of a run is written as one, and the MLflow model carries the same files (as the
artifact ``bundle`` of a pyfunc, see ``serving.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch

from .config import ModelConfig
from .data import tokenizer as toklib
from .models import Seq2Seq, build_model

BUNDLE_FILES = ("model.pt", "model.json", "src_tokenizer.json", "tgt_tokenizer.json")


class BundleError(ValueError):
    """A model used for what it was not trained for (a captioner given text, ...)."""


@dataclass
class BundleMeta:
    """model.json: what it takes to rebuild the model and feed it as in training: the model
    config, the vocabulary (with a captioner's input), the text cleaning and, for a captioner,
    the frame sampling. In the file the vocabulary's keys sit at the top level."""

    model: dict[str, Any]
    vocab: toklib.Vocab
    text: dict[str, Any] = field(default_factory=dict)  # normalization, lowercase
    sampling: dict[str, Any] | None = None

    @property
    def is_captioner(self) -> bool:
        return self.vocab.video is not None

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, **self.vocab.to_dict(), "text": self.text}
        if self.sampling is not None:
            out["sampling"] = self.sampling
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BundleMeta:
        return cls(d["model"], toklib.Vocab.from_dict(d), d.get("text", {}), d.get("sampling"))


def bundle_meta(model_cfg: ModelConfig, vocab: toklib.Vocab, data_cfg: Any) -> BundleMeta:
    text = {"normalization": data_cfg.normalization, "lowercase": data_cfg.lowercase}
    sampling = None
    if vocab.video:
        sampling = {k: getattr(data_cfg, k) for k in ("num_frames", "fps", "frame_size", "frame_encoder")}
    return BundleMeta(asdict(model_cfg), vocab, text, sampling)


def save_bundle(dest: str, model: torch.nn.Module, meta: BundleMeta, src_json: str, tgt_json: str) -> None:
    fs, root = fsspec.core.url_to_fs(dest)
    fs.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    files = {
        "model.json": json.dumps(meta.to_json(), indent=2).encode(),
        "src_tokenizer.json": src_json.encode(),
        "tgt_tokenizer.json": tgt_json.encode(),
        "model.pt": buf.getvalue(),
    }
    for name, data in files.items():  # model.pt last: a reader never sees weights without metadata
        with fs.open(f"{root}/{name}.tmp", "wb") as f:
            f.write(data)
        fs.mv(f"{root}/{name}.tmp", f"{root}/{name}")


@contextlib.contextmanager
def _located(location: str) -> Iterator[tuple[Any, str, BundleMeta]]:
    """A bundle folder (local or URI), or an MLflow model URI (runs:/, models:/) -> (fs, root,
    meta), read while the block runs; an MLflow model is downloaded into a temporary folder
    that is removed after it (loading reads every file into memory)."""
    with tempfile.TemporaryDirectory(prefix="pipeline-model-") as tmp:
        if location.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            import mlflow.artifacts

            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp)
            # The pyfunc keeps the bundle in artifacts/bundle/ (tracking.log_model); a folder of
            # bundle files (best_checkpoint/, or a model logged before) has it at its top.
            found = sorted(Path(local).rglob("model.json"), key=lambda p: p.parent.name != "bundle")
            if not found:
                raise FileNotFoundError(f"{location} has no model.json: not a model logged by this project")
            location = str(found[0].parent)
        fs, root = fsspec.core.url_to_fs(location)
        missing = [n for n in BUNDLE_FILES if not fs.exists(f"{root}/{n}")]
        if missing:
            raise FileNotFoundError(f"{location} is not a model bundle: missing {', '.join(missing)}")
        yield fs, root, BundleMeta.from_json(json.loads(fs.cat_file(f"{root}/model.json")))


def load_model(fs: Any, root: str, meta: BundleMeta) -> Seq2Seq:
    model = build_model(model_cfg=ModelConfig(**meta.model), **meta.vocab.model_args())
    state = torch.load(io.BytesIO(fs.cat_file(f"{root}/model.pt")), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


class Translator:
    """A loaded bundle: ``translate(["a sentence", ...])`` -> translations."""

    def __init__(self, model: Seq2Seq, meta: BundleMeta, src_json: str, tgt_json: str, device: str = "cpu"):
        self.model, self.meta = model.to(device).eval(), meta
        self.src_tok, self.tgt_tok = toklib.load_tokenizer(src_json), toklib.load_tokenizer(tgt_json)
        self.device = torch.device(device)

    @classmethod
    def load(cls, location: str, device: str = "cpu") -> Translator:
        """A bundle folder (local or URI), or an MLflow model URI (runs:/, models:/)."""
        with _located(location) as (fs, root, meta):
            cls._check_kind(meta, location)
            return cls(
                load_model(fs, root, meta),
                meta,
                fs.cat_file(f"{root}/src_tokenizer.json").decode(),
                fs.cat_file(f"{root}/tgt_tokenizer.json").decode(),
                device,
            )

    @staticmethod
    def _check_kind(meta: BundleMeta, location: str) -> None:
        if meta.is_captioner:
            raise BundleError(f"{location} is a video captioning model: use `pipeline caption`, not translate")

    def clean(self, text: str) -> str:
        t = self.meta.text
        return toklib.clean_text(text, t.get("normalization", "NFC"), bool(t.get("lowercase")))

    def translate(
        self, sentences: list[str], beam_size: int = 4, length_penalty: float = 0.6, batch_size: int = 64
    ) -> list[str]:
        ids = toklib.encode(self.src_tok, [self.clean(s) for s in sentences])
        out = decode_ids(self.model, ids, beam_size, length_penalty, batch_size, self.device)
        return toklib.decode(self.tgt_tok, out)

    def attention(self, sentences: list[str], max_len_ratio: float = 2.0) -> list[dict[str, Any]]:
        """Greedy translations of a few sentences with their attention: per sentence the
        ``source`` and ``output`` tokens (subword pieces; the output ends with ``</s>`` when
        EOS was emitted), ``weights`` (len(output), len(source)) and the ``translation``."""
        out = []
        for ids in toklib.encode(self.src_tok, [self.clean(s) for s in sentences]):
            ids = ids or [self.model.eos_id]  # an empty source still needs one token to encode
            src = torch.as_tensor([ids], dtype=torch.long, device=self.device)
            max_len = int(len(ids) * max_len_ratio) + 10
            (hyp,), (weights,) = self.model.greedy_attention(src, torch.as_tensor([len(ids)]), max_len)
            output = [self.tgt_tok.id_to_token(i) for i in hyp] + (["</s>"] if weights.size(0) > len(hyp) else [])
            out.append(
                {
                    "source": [self.src_tok.id_to_token(i) for i in ids],
                    "output": output,
                    "weights": weights.numpy(),
                    "translation": toklib.decode(self.tgt_tok, [hyp])[0],
                }
            )
        return out


class Captioner(Translator):
    """A loaded video bundle: ``caption_files(["clip.mp4", ...])`` or ``caption(clips)``.

    Clips are decoded and sampled exactly as in preprocessing (``model.json``'s sampling);
    a model trained on frozen-backbone features needs that backbone again (``backbone=``);
    one trained on precomputed features takes ``.npy`` feature files.
    """

    @staticmethod
    def _check_kind(meta: BundleMeta, location: str) -> None:
        if not meta.is_captioner:
            raise BundleError(f"{location} is a text model: use `pipeline translate`, not caption")

    def caption(
        self, clips: list[Any], beam_size: int = 4, length_penalty: float = 0.6, batch_size: int = 32
    ) -> list[str]:
        out = decode_clip_ids(self.model, clips, beam_size, length_penalty, batch_size, self.device)
        return toklib.decode(self.tgt_tok, out)

    def load_clips(self, paths: list[str], backbone: str = "") -> list[Any]:
        import numpy as np

        from .data.video import FrozenBackbone, decode_clip

        s, kind = self.meta.sampling, self.meta.vocab.video["kind"]
        net = None
        if kind == "features" and s["frame_encoder"] == "frozen":
            if not backbone:
                raise BundleError("this model was trained on frozen-backbone features: pass the same --backbone file")
            net = FrozenBackbone(backbone, "", "", "")
        clips = []
        for path in paths:
            if path.endswith(".npy"):
                clips.append(np.load(path, allow_pickle=False).astype(np.float16))
                continue
            if kind == "features" and net is None:
                raise BundleError(f"{path}: this model was trained on precomputed features; give .npy feature files")
            with fsspec.open(path, "rb") as f:
                frames = decode_clip(f.read(), s["num_frames"], s["frame_size"], s["fps"], path)
            clips.append(net.features(frames) if net is not None else frames)
        return clips


def decode_ids(
    model: Seq2Seq,
    src_ids: list[list[int]],
    beam_size: int,
    length_penalty: float,
    batch_size: int,
    device: torch.device,
    max_len_ratio: float = 2.0,
) -> list[list[int]]:
    """Batched greedy (beam 1) or beam search over token-id lists, in input order.

    Sentences are decoded sorted by length so a batch holds similar lengths.
    """
    model.eval()
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    out: list[list[int]] = [[] for _ in src_ids]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lens = [max(1, len(src_ids[i])) for i in idx]
        src = torch.full((len(idx), max(lens)), model.pad_id, dtype=torch.long)
        for r, i in enumerate(idx):
            src[r, : len(src_ids[i])] = torch.as_tensor(src_ids[i], dtype=torch.long)
        if not any(len(src_ids[i]) for i in idx):
            src[:, 0] = model.eos_id  # an empty source still needs one token to encode
        max_len = int(max(lens) * max_len_ratio) + 10
        src_lens = torch.as_tensor(lens)
        src = src.to(device)
        if beam_size == 1:
            hyps = model.greedy(src, src_lens, max_len)
        else:
            hyps = model.beam_search(src, src_lens, max_len, beam_size, length_penalty)
        for i, h in zip(idx, hyps):
            out[i] = h
    return out


def decode_clip_ids(
    model: Seq2Seq,
    clips: list[Any],
    beam_size: int,
    length_penalty: float,
    batch_size: int,
    device: torch.device,
    max_len: int = 40,
) -> list[list[int]]:
    """Batched greedy or beam search over clips (frames or features arrays), in input order."""
    from .data.video import pad_clips

    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(clips), batch_size):
        src, lens = pad_clips(clips[start : start + batch_size])
        src_t, lens = torch.from_numpy(src).to(device), torch.from_numpy(lens)
        if beam_size == 1:
            out += model.greedy(src_t, lens, max_len)
        else:
            out += model.beam_search(src_t, lens, max_len, beam_size, length_penalty)
    return out
