"""Model FLOPs of a training step, counted from the model's own layers, for throughput in
TFLOP/s and MFU (model FLOPs utilisation: those FLOP/s over the accelerator's peak).

Only matrix multiplications are counted (LSTM gates, attention, projections, the output
layer; element-wise work, the CNN of a video frame encoder and the loss are left out), 2
FLOPs per multiply-add, and backward = 2x forward. They are counted at real tokens only:
the padding a batch computes is overhead, not model work, as MFU is usually defined.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Dense (no sparsity) tensor-core peaks in TFLOP/s, (bf16/fp16, tf32), from the vendors' data
# sheets, keyed by the exact name ``torch.cuda.get_device_name()`` reports. Exact names, not
# substrings: "H100" alone covers the SXM part (989) and the PCIe card (756), and "L4" is a
# prefix of "L40S"; a name not listed has no MFU rather than a wrong one. ``peak_tflops``
# takes the precision the step runs in (``step_precision``).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (989.0, 494.0),
    "NVIDIA H100 80GB HBM3": (989.0, 494.0),  # SXM5
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H100 NVL": (835.0, 418.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "NVIDIA L40S": (362.0, 183.0),
    "NVIDIA L4": (121.0, 60.0),
}
# Plain fp32 (no tensor cores), for fp32 steps with tf32 off.
PEAK_FP32_TFLOPS = {
    "NVIDIA H200": 67.0,
    "NVIDIA H100 80GB HBM3": 67.0,
    "NVIDIA H100 PCIe": 51.0,
    "NVIDIA H100 NVL": 60.0,
    "NVIDIA A100-SXM4-40GB": 19.5,
    "NVIDIA A100-SXM4-80GB": 19.5,
    "NVIDIA A100-PCIE-40GB": 19.5,
    "NVIDIA A100 80GB PCIe": 19.5,
    "NVIDIA L40S": 91.6,
    "NVIDIA L4": 30.3,
}


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """The dense peak for a ``torch.cuda.get_device_name()`` string at ``precision``
    (bf16, fp16, tf32 or fp32), or None when the device is not in the table."""
    name = device_name.strip()
    if precision == "fp32":
        return PEAK_FP32_TFLOPS.get(name)
    if name not in PEAK_TFLOPS:
        return None
    half, tf32 = PEAK_TFLOPS[name]
    if precision in ("bf16", "fp16"):
        return half
    if precision == "tf32":
        return tf32
    raise ValueError(f"unknown precision {precision!r}: bf16, fp16, tf32 or fp32")


def step_precision(amp_dtype: object) -> str:
    """The precision name ``peak_tflops`` takes for a step autocast to ``amp_dtype`` (a torch
    dtype, or None for fp32). An fp32 step counts as tf32 when either of PyTorch's tf32
    switches is on: cuDNN's (on by default) runs the LSTMs, most of the work, in tf32, and
    measuring against the higher peak never overstates the MFU."""
    if amp_dtype is torch.bfloat16:
        return "bf16"
    if amp_dtype is torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 else "fp32"


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
