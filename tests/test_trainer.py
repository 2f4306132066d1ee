"""The torch-only Trainer in one process, no Ray: its step is the golden step, a zero-weight
micro-batch changes nothing, a checkpoint round trip continues bit for bit, and a checkpoint
of another model is refused naming the keys."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_golden import (
    CLIP_NORM,
    LABEL_SMOOTHING,
    LR,
    WARMUP,
    WEIGHT_DECAY,
    small_model_cfg,
    text_batch,
    text_model,
    train_steps,
)

from pipeline.config import TrainConfig
from pipeline.data.tokenizer import Vocab
from pipeline.tasks import TranslationTask
from pipeline.train.trainer import Trainer, TrainState, cpu_has_bf16, load_scaler_state, resolve_amp_dtype

CPU = torch.device("cpu")
GOLDEN_TRAIN = TrainConfig(
    lr=LR,
    weight_decay=WEIGHT_DECAY,
    warmup_steps=WARMUP,
    clip_norm=CLIP_NORM,
    label_smoothing=LABEL_SMOOTHING,
    amp_dtype="fp32",  # the golden step is plain fp32
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer() -> Trainer:
    return Trainer(text_model(), GOLDEN_TRAIN, CPU)


def test_the_trainer_step_is_the_golden_step():
    b = text_batch()
    tr = trainer()
    ours = [tr.step([b]) / b.real_tokens for _ in range(3)]
    assert ours == pytest.approx(train_steps(text_model(), b, 3), rel=1e-6)
    assert tr.state.step == 3 and tr.lr == pytest.approx(LR * (2 / 3) ** 0.5)


def test_a_zero_weight_micro_batch_changes_nothing():
    b = text_batch()
    blank = TranslationTask().blank_batch(Vocab(24, 20, False))
    one, padded = trainer(), trainer()
    for i in range(2):  # the same dropout masks for b in both (the blank runs after it)
        torch.manual_seed(i)
        one.step([b])
        torch.manual_seed(i)
        padded.step([b, None], blank=blank)
    for (name, p), q in zip(one.raw.named_parameters(), padded.raw.parameters()):
        assert torch.equal(p, q), name


def test_a_checkpoint_round_trip_continues_exactly(tmp_path):
    b = text_batch()
    tr = trainer()
    for _ in range(3):
        tr.step([b])
    tr.state.epoch, tr.state.best, tr.state.fingerprint = 1, 0.25, {"model.hidden_size": "64"}
    tr.save(str(tmp_path), np.array([5, 7, (1 << 32) | 3]))
    torch.manual_seed(1)  # dropout's masks are not part of a checkpoint
    expected = [tr.step([b]) for _ in range(2)]

    again = trainer()
    seen = again.load(str(tmp_path))
    assert sorted(seen.tolist()) == [5, 7, (1 << 32) | 3]
    assert again.state == TrainState(step=3, epoch=1, best=0.25, fingerprint={"model.hidden_size": "64"})
    torch.manual_seed(1)
    assert [again.step([b]) for _ in range(2)] == expected  # bit for bit: weights, Adam moments, schedule


def test_a_checkpoint_of_another_model_is_refused_naming_keys(tmp_path):
    trainer().save(str(tmp_path))
    base = small_model_cfg()
    cfg = dataclasses.replace(base, hidden_size=base.hidden_size // 2)

    from pipeline.models import build_model

    other = Trainer(
        build_model(
            model_cfg=cfg, src_vocab_size=24, tgt_vocab_size=20, joint_vocab=False, pad_id=0, bos_id=2, eos_id=3
        ),
        GOLDEN_TRAIN,
        CPU,
    )
    with pytest.raises(RuntimeError, match=r"does not fit this model config; mismatched keys: \['decoder"):
        other.load(str(tmp_path))


def test_a_saved_state_of_an_older_version_loads():
    s = TrainState.from_dict({"step": 40, "epoch": 2, "best": 1.5, "stop": "max_minutes", "elapsed_s": 3.0})
    assert s == TrainState(step=40, epoch=2, best=1.5, elapsed_s=3.0, validated_step=40)


def test_evaluate_gives_loss_and_outputs_without_ray():
    b = text_batch()
    tr = trainer()
    for _ in range(20):
        tr.step([b])
    rows = {
        "id": [0, 1],
        "src_ids": [np.array([4, 9, 13, 7, 5]), np.array([6, 11, 8])],
        "tgt_ids": [np.array([5, 8, 12, 4]), np.array([9, 6])],
        "src": ["a", "b"],
        "tgt": ["x", "y"],
    }
    out = tr.evaluate(TranslationTask(), rows, beam_size=1, length_penalty=0.6)
    assert out["tokens"] == 4 + 1 + 2 + 1  # targets and their EOS
    assert 0 < out["loss"] / out["tokens"] < 5
    assert len(out["hyp_ids"]) == 2 and out["ref"] == ["x", "y"]
    assert tr.raw.training  # back in training mode


def test_the_step_leaves_its_loss_on_the_device_unread():
    """The step returns the loss as a float64 tensor for the caller to add up and read once
    per log window, never a Python float (a read each micro-batch stalls a GPU)."""
    b = text_batch()
    loss = trainer().step([b])
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.device == CPU and not loss.requires_grad
    assert float(loss) / b.real_tokens == pytest.approx(train_steps(text_model(), b, 1)[0], rel=1e-6)


def test_amp_dtype_resolves_per_device_and_only_fp16_gets_a_grad_scaler(monkeypatch):
    assert resolve_amp_dtype("fp32", CPU) is None
    # auto on CPU: bf16 where the CPU has it in hardware (AVX512-BF16 or AMX), else fp32.
    assert resolve_amp_dtype("auto", CPU) is (torch.bfloat16 if cpu_has_bf16() else None)
    for avx512_bf16, amx, want in ((False, False, None), (True, False, torch.bfloat16), (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_amp_dtype("auto", CPU) is want
        if want is None:  # without them oneDNN has no bf16 LSTM: refused, not a crash in _VF.lstm
            with pytest.raises(ValueError, match=r"bf16 on CPU needs AVX512-BF16 or AMX, which this CPU \(\w+\) lacks"):
                resolve_amp_dtype("bf16", CPU)
        else:
            assert resolve_amp_dtype("bf16", CPU) is torch.bfloat16
    monkeypatch.undo()
    with pytest.raises(ValueError, match="train.amp_dtype=fp16 needs a GPU"):
        resolve_amp_dtype("fp16", CPU)
    assert trainer().precision == "fp32"
    if not cpu_has_bf16():
        return  # the bf16 step itself needs the hardware (above: refused without it)
    b = text_batch()
    bf16 = Trainer(text_model(), dataclasses.replace(GOLDEN_TRAIN, amp_dtype="bf16"), CPU)
    assert bf16.amp_dtype is torch.bfloat16 and bf16.precision == "bf16" and not bf16.scaler.is_enabled()
    fp32, ours = float(trainer().step([b])), float(bf16.step([b]))
    assert ours != fp32 and ours == pytest.approx(fp32, rel=0.05)  # bf16 autocast ran, and trains the same


def _backed_off_scaler() -> torch.amp.GradScaler:
    """A real, enabled GradScaler after one overflowing step: scale halved from 2**16."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    s = torch.amp.GradScaler("cpu", enabled=True)
    s.scale((p * float("inf")).sum()).backward()
    s.step(opt)
    s.update()
    return s


def test_a_grad_scaler_state_loads_across_devices_and_precisions(tmp_path):
    saved = _backed_off_scaler().state_dict()
    assert saved["scale"] == 2.0**15
    # Plain numbers, no tensors: nothing in it is tied to the device it was saved on, so a
    # GPU's state loads on CPU and the other way round.
    assert all(isinstance(v, int | float) for v in saved.values())
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler_state(fresh, saved)
    assert fresh.state_dict()["scale"] == 2.0**15
    # A bf16/fp32/CPU run saved a disabled scaler ({}); resumed in fp16 it starts fresh, where
    # torch's own load refuses it.
    with pytest.raises(RuntimeError, match="state dict is empty"):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict({})
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler_state(fresh, {})
    load_scaler_state(fresh, None)  # a checkpoint from before scalers were saved
    assert fresh.state_dict()["scale"] == 2.0**16
    # An fp16 run's checkpoint (enabled scaler) resumes in a run without one.
    tr = trainer()
    tr.step([text_batch()])
    tr.scaler = _backed_off_scaler()
    tr.save(str(tmp_path))
    stored = torch.load(tmp_path / "optim.pt", map_location="cpu", weights_only=True)["scaler"]
    assert stored == saved
    again = trainer()
    again.load(str(tmp_path))
    assert again.state.step == 1 and not again.scaler.is_enabled()


def test_the_host_found_real_token_positions_select_exactly_what_the_mask_does():
    b = text_batch()
    assert b.real_index is not None and b.real_index.numel() == b.real_tokens
    results = []
    for index in (None, b.real_index):
        model = text_model()
        torch.manual_seed(3)  # the same dropout masks
        loss, n = model(b.src, b.src_lens, b.tgt_in, b.tgt_out, LABEL_SMOOTHING, None, index)
        loss.backward()
        results.append((loss.detach(), int(n), [p.grad.clone() for p in model.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = results
    assert torch.equal(l1, l2) and n1 == n2 == b.real_tokens
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_validation_runs_in_rounds_with_a_look_between_each_and_the_same_result(monkeypatch):
    """The loop's validation (no process group: one rank) goes in rounds of VAL_ROUND_ROWS rows
    with a call between rounds, where it looks for a drain notice; every row is scored once
    and the loss is that of one pass over all rows."""
    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.train import loop

    tok = train_tokenizer(["a b c d e f g h i j k l m n"] * 4, "bpe", 40)
    tr = trainer()
    rng = np.random.default_rng(0)
    n = 10
    rows = {
        "id": list(range(n)),
        "src_ids": [rng.integers(4, 24, size=int(rng.integers(2, 9))) for _ in range(n)],
        "tgt_ids": [rng.integers(4, 20, size=int(rng.integers(2, 7))) for _ in range(n)],
        "src": [f"s{i}" for i in range(n)],
        "tgt": [f"t{i}" for i in range(n)],
    }
    task = TranslationTask()
    looks = []
    whole = loop.evaluate(tr, rows, task, tok, 1, 0.6, lambda: looks.append(1))
    assert looks == []  # one round: nothing between
    monkeypatch.setattr(loop, "VAL_ROUND_ROWS", 4)
    rounds = loop.evaluate(tr, rows, task, tok, 1, 0.6, lambda: looks.append(1))
    assert len(looks) == 2  # rounds of 4, 4 and 2 rows
    assert rounds["id"] == whole["id"] == list(range(n)) and rounds["ref"] == whole["ref"]
    # Greedy outputs of an untrained model may flip with the padding of its batch; the loss may not.
    assert len(rounds["hyp"]) == n and rounds["loss"] == pytest.approx(whole["loss"], rel=1e-5)


def test_a_checkpoint_at_a_validation_that_did_not_happen_is_validated_first():
    """A drain notice at a validation point checkpoints unvalidated; the next attempt validates
    that step before training (else its validation was lost: val_loss had a gap)."""
    from pipeline.train.loop import validation_due

    assert validation_due(TrainState(step=80, validated_step=40), eval_every=40, skipped=120)  # at a multiple
    assert validation_due(TrainState(step=83, epoch=1, validated_step=40), eval_every=0, skipped=0)  # an epoch's end
    assert not validation_due(TrainState(step=83, validated_step=40), eval_every=40, skipped=90)  # mid-epoch
    assert not validation_due(TrainState(step=80, validated_step=80), eval_every=40, skipped=0)  # validated
    assert not validation_due(TrainState(), eval_every=40, skipped=0)  # nothing trained
