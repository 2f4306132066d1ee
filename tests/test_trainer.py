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
from pipeline.train.trainer import Trainer, TrainState

CPU = torch.device("cpu")
GOLDEN_TRAIN = TrainConfig(
    lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP, clip_norm=CLIP_NORM, label_smoothing=LABEL_SMOOTHING
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
