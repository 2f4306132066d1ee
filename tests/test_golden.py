"""Golden numbers, in the manner of torchtune's recipe tests: the exact losses of three
seeded optimizer steps of the small model on a fixed tiny batch, and the exact greedy and
beam-search ids it then decodes; and two seeded steps of the captioner (frames through the
CNN input module).

THESE NUMBERS PIN THE CURRENT BEHAVIOUR. They were recorded from the code as it stood
(torch 2.13.0 CPU build, one thread). A change that moves any of them (initialisation,
dropout placement, the loss, the schedule, the decoder, beam search) must say why in its
commit message, and re-record them here. A change that is meant to be behaviour-neutral
(a refactor) must leave them exactly as they are.

Only the lowest, most stable pieces are called: ``build_model`` with keyword arguments,
the model's forward, ``lr_factor``, ``collate``/``collate_clips`` and ``decode_ids``. The
step itself is written out here as the training loop does it (AdamW, ``lr_factor`` warmup
through LambdaLR, the summed loss scaled to a per-token mean, gradient clipping), so a
refactor of the loop's wiring does not move the numbers but a change to the maths does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ModelConfig
from pipeline.inference import decode_ids
from pipeline.models import build_model
from pipeline.tasks.captioning import collate_clips
from pipeline.train.batching import collate
from pipeline.train.trainer import lr_factor

REPO = Path(__file__).resolve().parent.parent
PAD, UNK, BOS, EOS = 0, 1, 2, 3

# The recipe of the pinned steps: TrainConfig's defaults for lr, weight decay, clip norm and
# label smoothing, written out so that a change of default does not move them; a short
# warmup so that the first steps move the weights by a measurable amount.
LR, WEIGHT_DECAY, WARMUP, CLIP_NORM, LABEL_SMOOTHING = 0.002, 0.0, 2, 1.0, 0.1

SRC_VOCAB, TGT_VOCAB = 24, 20
SRC = [[4, 9, 13, 7, 5], [6, 11, 8], [12, 4, 4, 21, 17, 10, 9], [15, 23]]
TGT = [[5, 8, 12, 4], [9, 6], [17, 11, 4, 19, 7, 13], [10, 14, 16]]
DECODE_AFTER = 50  # optimizer steps before the decoding tests
DECODE_SRC = [[4, 9, 13, 7, 5], [20, 18, 6], [15, 23, 12, 4], [12, 4, 4, 21]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op parallelism can change the order of float sums: pin one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model_cfg() -> ModelConfig:
    return ModelConfig(**yaml.safe_load((REPO / "conf" / "model" / "small.yaml").read_text()))


def train_steps(model: torch.nn.Module, batch, steps: int) -> list[float]:
    """The training loop's optimizer step, written out: per-token mean loss of each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, WARMUP))
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_sum, n = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out, LABEL_SMOOTHING, batch.src_index)
        assert int(n) == batch.real_tokens
        (loss_sum / batch.real_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        sched.step()
        losses.append(float(loss_sum.detach()) / batch.real_tokens)
    return losses


def text_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        model_cfg=small_model_cfg(),
        src_vocab_size=SRC_VOCAB,
        tgt_vocab_size=TGT_VOCAB,
        joint_vocab=False,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
    )


def text_batch():
    return collate(
        [np.asarray(s, dtype=np.int64) for s in SRC],
        [np.asarray(t, dtype=np.int64) for t in TGT],
        list(range(len(SRC))),
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
    )


@pytest.fixture(scope="module")
def trained_text():
    """One seeded run of DECODE_AFTER steps (under a second): the first three losses are
    the golden steps; the decoding tests read the model at the end, trained far enough to
    emit real tokens (after three steps it emits EOS first) and for beam search to differ
    from greedy, not so far that it has merely memorised the batch."""
    with torch.random.fork_rng():
        model = text_model()
        losses = train_steps(model, text_batch(), DECODE_AFTER)
    return model, losses


def test_small_model_three_step_losses(trained_text):
    _, losses = trained_text
    assert losses[:3] == pytest.approx(GOLDEN_TEXT_LOSSES, rel=1e-5)


def test_small_model_loss_after_decode_steps(trained_text):
    _, losses = trained_text
    assert losses[-1] == pytest.approx(GOLDEN_TEXT_FINAL_LOSS, rel=1e-5)


def test_small_model_greedy_ids(trained_text):
    model, _ = trained_text
    got = decode_ids(model, DECODE_SRC, beam_size=1, length_penalty=0.6, batch_size=8, device=torch.device("cpu"))
    assert got == GOLDEN_GREEDY


@pytest.mark.parametrize("length_penalty", [0.6, 0.0])
def test_small_model_beam_ids(trained_text, length_penalty):
    model, _ = trained_text
    got = decode_ids(
        model, DECODE_SRC, beam_size=4, length_penalty=length_penalty, batch_size=8, device=torch.device("cpu")
    )
    assert got == GOLDEN_BEAM[length_penalty]


def test_captioner_step_losses():
    """Two steps of the captioner (the second sees the first's update, CNN included): 2 clips
    of 4 and 3 RGB 16x16 frames through the CNN input module, three captions (clip 0 has
    two, encoded once through ``src_index``)."""
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, size=(k, 16, 16, 3), dtype=np.uint8) for k in (4, 3)]
    caps = [np.asarray(c, dtype=np.int64) for c in ([5, 8, 12], [5, 9, 6, 4], [14, 7])]
    batch = collate_clips(clips, caps, [0, 1, 1024], pad_id=PAD, bos_id=BOS, eos_id=EOS, src_index=[0, 0, 1])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(
            model_cfg=small_model_cfg(),
            src_vocab_size=TGT_VOCAB,
            tgt_vocab_size=TGT_VOCAB,
            pad_id=PAD,
            bos_id=BOS,
            eos_id=EOS,
            video={"kind": "frames", "feature_dim": 0},
        )
        losses = train_steps(model, batch, 2)
    assert losses == pytest.approx(GOLDEN_CAPTION_LOSSES, rel=1e-5)


# Recorded on torch 2.13.0 (CPU build), one thread; see the module docstring before editing.
GOLDEN_TEXT_LOSSES = [2.979194440339741, 2.964224564401727, 2.9482411836322986]
GOLDEN_TEXT_FINAL_LOSS = 1.5464703409295333  # step DECODE_AFTER
GOLDEN_GREEDY = [[5, 8, 4, 4], [5, 8], [5, 8, 4], [17, 11, 4, 4]]
GOLDEN_BEAM = {  # beam 4, by length penalty: differs from greedy on three of four; the penalty decides lengths
    0.6: [[5, 8, 4, 4], [9, 6], [5, 14, 16], [17, 11, 4]],
    0.0: [[5, 8, 4], [9, 6], [5, 14], [17, 11, 4]],
}
GOLDEN_CAPTION_LOSSES = [2.9933624267578125, 2.9210659662882485]
