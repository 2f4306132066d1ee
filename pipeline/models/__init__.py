"""Models (torch only): the LSTM encoder-decoder and ``build_model``, config to module."""

from __future__ import annotations

from typing import Any

from .seq2seq import FrameInput, Seq2Seq

__all__ = ["FrameInput", "Seq2Seq", "build_model"]


def build_model(
    *,
    model_cfg: Any,
    src_vocab_size: int,
    tgt_vocab_size: int,
    joint_vocab: bool = False,
    pad_id: int = 0,
    bos_id: int = 2,
    eos_id: int = 3,
    video: dict | None = None,
) -> Seq2Seq:
    """Map a ``ModelConfig`` (same key names as the arguments) to a module. ``video``
    (the manifest's ``video`` entry: kind frames|features, feature_dim) makes a captioner:
    the same encoder-decoder with frames or features as the encoder's input."""
    src_input = None
    if video:
        src_input = FrameInput(
            video["kind"],
            model_cfg.embedding_size,
            model_cfg.dropout,
            feature_dim=video.get("feature_dim", 0),
            channels=model_cfg.cnn_channels,
            shift=model_cfg.frame_shift,
        )
    return Seq2Seq(
        src_vocab_size=src_vocab_size,
        tgt_vocab_size=tgt_vocab_size,
        embedding_size=model_cfg.embedding_size,
        hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers,
        dropout=model_cfg.dropout,
        attention=model_cfg.attention,
        input_feeding=model_cfg.input_feeding,
        tie_embeddings=model_cfg.tie_embeddings,
        joint_vocab=joint_vocab,
        pad_id=pad_id,
        bos_id=bos_id,
        eos_id=eos_id,
        src_input=src_input,
    )
