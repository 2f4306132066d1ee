"""Model FLOPs of a training step, counted from the model's own layers, for throughput in
TFLOP/s and MFU (model FLOPs utilisation: those FLOP/s over the accelerator's peak).

Only matrix multiplications are counted (LSTM gates, attention, projections, the output
layer; element-wise work, the CNN of a video frame encoder and the loss are left out), 2
FLOPs per multiply-add, and backward = 2x forward. They are counted at real tokens only:
the padding a batch computes is overhead, not model work, as MFU is usually defined.
"""

from __future__ import annotations

import numpy as np
from torch import nn

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device name, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The peak for a ``torch.cuda.get_device_name()`` string, or None when unknown."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


def _lstm_macs(lstm: nn.LSTM) -> int:
    """Multiply-adds per time step (all layers, both directions)."""
    d = 2 if lstm.bidirectional else 1
    h = lstm.hidden_size
    return sum(d * 4 * h * ((lstm.input_size if layer == 0 else d * h) + h) for layer in range(lstm.num_layers))


def train_step_flops(
    model: nn.Module, src_lens: np.ndarray, tgt_lens: np.ndarray, pairs: np.ndarray | None = None
) -> float:
    """FLOPs of forward + backward for one batch.

    ``src_lens``: real lengths of the encoded sources (each distinct clip once for video);
    ``tgt_lens``: real target lengths (EOS included); ``pairs``: for each target, the
    length of its source (defaults to ``src_lens``, one source per target).
    """
    enc, dec = model.encoder, model.decoder
    src_tokens, tgt_tokens = float(np.sum(src_lens)), float(np.sum(tgt_lens))
    cross = float(np.dot(tgt_lens, src_lens if pairs is None else pairs))  # target x source positions
    h = dec.hidden_size
    macs = src_tokens * _lstm_macs(enc.lstm) + tgt_tokens * _lstm_macs(dec.lstm)
    proj = getattr(enc.embedding, "proj", None)  # video: frame vectors -> encoder input
    if isinstance(proj, nn.Linear):
        macs += src_tokens * proj.in_features * proj.out_features
    kind = dec.attention.attention
    if kind != "dot":
        macs += src_tokens * h * h  # keys, once per source position
    if kind == "mlp":
        macs += tgt_tokens * h * h + cross * h  # query projection; v over every (target, source) pair
        macs += cross * h  # context
    else:
        macs += 2 * cross * h  # scores and context
    macs += tgt_tokens * 2 * h * h  # combine [context; state] -> attentional vector
    if dec.to_embedding is not None:
        macs += tgt_tokens * h * dec.to_embedding.out_features
    macs += tgt_tokens * dec.generator.in_features * dec.generator.out_features
    return 6.0 * macs  # 2 FLOPs per multiply-add; forward + backward = 3 x forward
