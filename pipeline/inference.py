"""Using a trained model: the model bundle on disk, batched decoding, text in and out.

A *bundle* is a folder (local or URI) with ``model.pt`` (a state dict, loaded with
``weights_only=True``), ``model.json`` (model config, vocabulary sizes, special ids,
text cleaning) and ``src_tokenizer.json`` / ``tgt_tokenizer.json``. The best checkpoint
of a run is written as one, and the MLflow model carries the same files.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fsspec
import torch

from .config import ModelConfig
from .data import tokenizer as toklib
from .models import Seq2Seq, build_model

BUNDLE_FILES = ("model.pt", "model.json", "src_tokenizer.json", "tgt_tokenizer.json")


def bundle_meta(model_cfg: ModelConfig, vocab: dict[str, Any], data_cfg: Any) -> dict[str, Any]:
    return {"model": asdict(model_cfg), **vocab,
            "text": {"normalization": data_cfg.normalization, "lowercase": data_cfg.lowercase}}


def save_bundle(dest: str, model: torch.nn.Module, meta: dict[str, Any], src_json: str, tgt_json: str) -> None:
    fs, root = fsspec.core.url_to_fs(dest)
    fs.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    files = {"model.json": json.dumps(meta, indent=2).encode(), "src_tokenizer.json": src_json.encode(),
             "tgt_tokenizer.json": tgt_json.encode(), "model.pt": buf.getvalue()}
    for name, data in files.items():  # model.pt last: a reader never sees weights without metadata
        with fs.open(f"{root}/{name}.tmp", "wb") as f:
            f.write(data)
        fs.mv(f"{root}/{name}.tmp", f"{root}/{name}")


class Translator:
    """A loaded bundle: ``translate(["a sentence", ...])`` -> translations."""

    def __init__(self, model: Seq2Seq, meta: dict[str, Any], src_json: str, tgt_json: str, device: str = "cpu"):
        self.model, self.meta = model.to(device).eval(), meta
        self.src_tok, self.tgt_tok = toklib.load_tokenizer(src_json), toklib.load_tokenizer(tgt_json)
        self.device = torch.device(device)

    @classmethod
    def load(cls, location: str, device: str = "cpu") -> "Translator":
        """A bundle folder (local or URI), or an MLflow model URI (runs:/, models:/)."""
        if location.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            import mlflow.artifacts

            local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tempfile.mkdtemp())
            found = list(Path(local).rglob("model.json"))
            if not found:
                raise FileNotFoundError(f"{location} has no model.json: not a model logged by this project")
            location = str(found[0].parent)
        fs, root = fsspec.core.url_to_fs(location)
        missing = [n for n in BUNDLE_FILES if not fs.exists(f"{root}/{n}")]
        if missing:
            raise FileNotFoundError(f"{location} is not a model bundle: missing {', '.join(missing)}")
        meta = json.loads(fs.cat_file(f"{root}/model.json"))
        model = build_model(ModelConfig(**meta["model"]), meta["src_vocab_size"], meta["tgt_vocab_size"],
                            meta["joint_vocab"], meta["pad_id"], meta["bos_id"], meta["eos_id"])
        state = torch.load(io.BytesIO(fs.cat_file(f"{root}/model.pt")), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return cls(model, meta, fs.cat_file(f"{root}/src_tokenizer.json").decode(),
                   fs.cat_file(f"{root}/tgt_tokenizer.json").decode(), device)

    def clean(self, text: str) -> str:
        t = self.meta.get("text", {})
        return toklib.clean_text(text, t.get("normalization", "NFC"), bool(t.get("lowercase")))

    def translate(self, sentences: list[str], beam_size: int = 4, length_penalty: float = 0.6,
                  batch_size: int = 64) -> list[str]:
        ids = toklib.encode(self.src_tok, [self.clean(s) for s in sentences])
        out = decode_ids(self.model, ids, beam_size, length_penalty, batch_size, self.device)
        return toklib.decode(self.tgt_tok, out)


def decode_ids(model: Seq2Seq, src_ids: list[list[int]], beam_size: int, length_penalty: float,
               batch_size: int, device: torch.device, max_len_ratio: float = 2.0) -> list[list[int]]:
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
