"""Captioning metrics: parity with pycocoevalcap's scorers on the same tokens, and sanity checks."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import threading

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pipeline import metrics
from pipeline.metrics import bleu4, caption_scores, caption_tokens, cider_d, meteor, rouge_l

_SUBJECTS = ["a man", "A woman", "two dogs", "a young girl", "The children", "an old man", "a cat"]
_ADJS = ["red", "small", "wet", "crowded", "green", "wooden", "", ""]
_VERBS = ["is riding", "is playing with", "sits on", "are walking along", "holds", "is looking at"]
_OBJECTS = ["bike", "ball", "bench", "street", "frisbee", "guitar", "beach", "t-shirt", "boat"]
_TAILS = [".", "", " in the park.", ", smiling!", " near the water.", " at 5 p.m.", "; it's sunny"]


def _caption(rng: random.Random) -> str:
    adj = rng.choice(_ADJS)
    obj = f"{adj} {rng.choice(_OBJECTS)}".strip()
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} a {obj}{rng.choice(_TAILS)}"


def _hypothesis(rng: random.Random, i: int, refs: list[str]) -> str:
    """Cycles through the cases: exact ref, unrelated, near-empty, edited ref, repetitive, fresh."""
    kind = i % 6
    if kind == 0:
        return rng.choice(refs).upper() if i % 12 == 0 else rng.choice(refs)
    if kind == 1:
        return "A plate of food on a table."
    if kind == 2:
        return rng.choice(["", "...", "a", "Dog!", "a man"])
    if kind == 3:
        words = rng.choice(refs).split()
        del words[rng.randrange(len(words))]
        return " ".join(words)
    if kind == 4:
        return " ".join([rng.choice(refs).split()[1]] * rng.randint(2, 7))
    return _caption(rng)


def _dataset(n: int = 50, seed: int = 7) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    refs = [[_caption(rng) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    refs[5].append("...")  # a reference that tokenises to nothing
    return [_hypothesis(rng, i, rs) for i, rs in enumerate(refs)], refs


def _tokenised(hyps: list[str], refs: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    return ([" ".join(caption_tokens(h)) for h in hyps], [[" ".join(caption_tokens(r)) for r in rs] for rs in refs])


def _coco(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """pycocoevalcap's own scorers on the given (already tokenised) text, no Java tokeniser."""
    gts = dict(enumerate(refs))
    res = {i: [h] for i, h in enumerate(hyps)}
    return {
        "bleu4": float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]),
        "rouge_l": float(Rouge().compute_score(gts, res)[0]),
        "cider": float(Cider().compute_score(gts, res)[0]),
    }


def _ours(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    return {"bleu4": bleu4(hyps, refs), "rouge_l": rouge_l(hyps, refs), "cider": cider_d(hyps, refs)}


def test_parity_with_pycocoevalcap() -> None:
    hyps, refs = _tokenised(*_dataset())
    assert "" in hyps  # the near-empty cases really are there
    theirs = _coco(hyps, refs)
    assert _ours(hyps, refs) == pytest.approx(theirs, abs=1e-6)
    assert 0 < theirs["bleu4"] < 1 and 0 < theirs["cider"]  # not a degenerate comparison
    assert caption_scores(*_dataset()) == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_parity_on_other_sets(seed: int) -> None:
    # Smaller sets shift the corpus-level brevity penalty and the CIDEr document frequencies.
    hyps, refs = _tokenised(*_dataset(n=8 * seed, seed=seed))
    assert _ours(hyps, refs) == pytest.approx(_coco(hyps, refs), abs=1e-6)


def test_bleu_closest_reference_length_prefers_the_shorter_on_ties() -> None:
    # Refs of 4 and 6 words around a 5-word hyp: "closest" picks 4, so no brevity penalty.
    hyps, refs = ["a b c d e"], [["a b c d", "a b c d e f"]]
    assert bleu4(hyps, refs) == pytest.approx(_coco(hyps, refs)["bleu4"], abs=1e-12)
    assert bleu4(hyps, refs) == pytest.approx(bleu4(hyps, [["a b c d e f"]]) * math.exp(6 / 5 - 1))


def test_perfect_and_constant_captions() -> None:
    _, refs = _tokenised(*_dataset())
    refs = [[r for r in rs if r] for rs in refs]  # an empty hyp cannot score 1
    perfect = [rs[i % len(rs)] for i, rs in enumerate(refs)]
    assert bleu4(perfect, refs) == pytest.approx(1.0, abs=1e-9)
    constant = ["a man is riding a bike"] * len(refs)
    assert cider_d(constant, refs) < 0.2 * cider_d(perfect, refs)
    assert bleu4(constant, refs) < bleu4(perfect, refs)


def test_caption_tokens() -> None:
    assert caption_tokens('A Man, "Smiling" -- rides a T-shirt... (red)!') == [
        "a",
        "man",
        "smiling",
        "rides",
        "a",
        "t-shirt",
        "red",
    ]
    assert caption_tokens("The dog's ball isn't 3.5 inches; at 5 p.m.?") == [
        "the",
        "dog",
        "'s",
        "ball",
        "is",
        "n't",
        "3.5",
        "inches",
        "at",
        "5",
        "p.m.",
    ]
    assert caption_tokens(" ... ") == []


def test_empty_and_mismatched_input() -> None:
    assert caption_scores([], []) == {"bleu4": 0.0, "rouge_l": 0.0, "cider": 0.0}
    with pytest.raises(ValueError):
        caption_scores(["a dog"], [])
    with pytest.raises(ValueError):
        bleu4(["a dog"], [[]])


def test_meteor_without_java_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics.shutil, "which", lambda _name: None)
    assert meteor(["a dog"], [["a dog"]]) is None
    assert "meteor" not in caption_scores(["a dog"], [["a dog"]], with_meteor=True)


def test_meteor_failure_is_none_and_closes_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Broken] = []

    class Broken:  # stands in for pycocoevalcap's Meteor: a live process, then an error
        def __init__(self) -> None:
            self.meteor_p = subprocess.Popen(
                ["sleep", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self.lock = threading.Lock()
            started.append(self)

        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            self.lock.acquire()  # as the real one does, never released on error
            raise ValueError("could not convert string to float: ''")

    import pycocoevalcap.meteor.meteor as coco_meteor

    monkeypatch.setattr(metrics.shutil, "which", lambda _name: "/usr/bin/java")
    monkeypatch.setattr(coco_meteor, "Meteor", Broken)
    assert meteor(["a dog"], [["a dog"]]) is None
    assert started and started[0].meteor_p.poll() is not None  # killed and reaped
    assert not started[0].lock.locked()  # so its __del__ cannot hang


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_with_java() -> None:
    _, refs = _tokenised(*_dataset(n=12))
    refs = [[r for r in rs if r] for rs in refs]
    good = meteor([rs[0] for rs in refs], refs)
    bad = meteor(["a plate of food on a table"] * len(refs), refs)
    assert good is not None and bad is not None
    assert 0 < good <= 1 and bad < good
