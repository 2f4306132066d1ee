"""The FLOP count behind train_tflops and mfu, checked against PyTorch's own counter."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import Seq2Seq
from pipeline.models.flops import _lstm_macs, peak_tflops, train_step_flops


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
