"""bench/video_carry.py's reading of captions: what each caption gets right, attribute by
attribute, against the clips' true attributes (the 15-minute run itself is the bench's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("video_carry", REPO / "bench" / "video_carry.py")
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)

TRUTH = [
    {"shape": "square", "colour": "cyan", "size": "small", "direction": "left"},
    {"shape": "ring", "colour": "red", "size": "large", "direction": "up"},
    {"shape": "cross", "colour": "white", "size": "medium", "direction": "down"},
]


def test_attribute_accuracy_reads_synonyms_and_counts_a_missing_word_as_wrong():
    hyps = [
        "a little turquoise circle moves to the left",  # shape wrong (circle for square)
        "a huge red hoop floats upwards",  # all right, in synonyms
        "a medium white plus glides",  # no direction named
    ]
    acc = carry.attribute_accuracy(hyps, TRUTH, "noise")
    assert acc == {"shape": 2 / 3, "colour": 1.0, "size": 1.0, "direction": 2 / 3}
    assert carry.confusions(hyps, TRUTH, "noise", "shape") == {
        "cross": {"cross": 1},
        "ring": {"ring": 1},
        "square": {"circle": 1},
    }
    assert carry.confusions(hyps, TRUTH, "noise", "direction")["down"] == {"-": 1}
    # The demo's words are not the noise corpus's: "violet" names nothing there.
    assert carry.attribute_accuracy(["a violet box"], TRUTH[:1], "noise")["colour"] == 0.0
