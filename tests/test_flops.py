"""The FLOP count behind train_tflops and mfu, checked against PyTorch's own counter."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import Seq2Seq
from pipeline.models.flops import _lstm_macs, peak_tflops, step_precision, train_step_flops


def _weights(lstm):
    return sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("weight"))


@pytest.mark.parametrize("attention", ["dot", "general", "mlp"])
@pytest.mark.parametrize("tie", [True, False])
def test_step_flops_match_pytorch_flop_counter(attention, tie):
    torch.manual_seed(0)
    model = Seq2Seq(500, 400, 32, 64, 2, 0.0, attention=attention, tie_embeddings=tie)
    b, s, t = 4, 7, 5
    src, tgt_in, tgt_out = torch.randint(4, 500, (b, s)), torch.randint(4, 400, (b, t)), torch.randint(4, 400, (b, t))
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(src, torch.full((b,), s), tgt_in, tgt_out)
        loss.backward()
    ours = train_step_flops(model, np.full(b, s), np.full(b, t))
    # PyTorch's counter does not see inside CPU nn.LSTM kernels: those are checked apart,
    # each LSTM weight being one multiply-add per token.
    lstm = 6 * (b * s * _lstm_macs(model.encoder.lstm) + b * t * _lstm_macs(model.decoder.lstm))
    assert ours - lstm == counter.get_total_flops()
    assert _lstm_macs(model.encoder.lstm) == _weights(model.encoder.lstm)
    assert _lstm_macs(model.decoder.lstm) == _weights(model.decoder.lstm)


def test_padding_is_not_counted_and_peaks_are_known():
    model = Seq2Seq(500, 500, 32, 64, 1, 0.0)
    full = train_step_flops(model, np.array([7, 7]), np.array([5, 5]))
    half = train_step_flops(model, np.array([7, 0]), np.array([5, 0]))
    assert half == pytest.approx(full / 2)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("Some New Accelerator") is None


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM5
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "fp16", 989.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA A100-SXM4-40GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.0),
        ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
    ],
)
def test_peaks_go_by_the_exact_device_name_and_precision(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_an_unknown_or_partial_device_name_has_no_peak():
    # Substrings once matched: "H100" gave the SXM peak to a PCIe card, and "L4" would match "L40".
    for name in ("Some New Accelerator", "H100", "NVIDIA H100", "NVIDIA L40", "NVIDIA A100", "Tesla T4"):
        assert peak_tflops(name) is None, name
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        peak_tflops("NVIDIA H200", "int8")


def test_the_step_precision_names_the_peak_it_is_measured_against():
    assert step_precision(torch.bfloat16) == "bf16" and step_precision(torch.float16) == "fp16"
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for matmul, cudnn, expected in ((False, False, "fp32"), (True, False, "tf32"), (False, True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
            assert step_precision(None) == expected, (matmul, cudnn)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
