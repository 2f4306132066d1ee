"""bench/peers.py's reading of the peer: OpenNMT-py 3.5.1's report lines (target tokens/s per
window), its last checkpoint, the config it trains from, and the scoring both sides share.
The peer itself (its own venv, 12-minute runs) is the bench's, not the suite's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("peers", REPO / "bench" / "peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

# Two report lines as onmt_train 3.5.1 writes them (onmt/utils/statistics.py, Statistics.output).
LOG = """[2026-12-01 10:00:01,000 INFO] Step 50/10000000; acc: 6.1; ppl: 1811.2; xent: 7.5; lr: 0.00100; \
sents:    4119; bsz: 1032/1187/82; 3517/4046 tok/s;     15 sec;
[2026-12-01 10:00:02,000 INFO] some other line 12/34 tok/s
[2026-12-01 10:00:16,000 INFO] Step 100/10000000; acc: 11.9; ppl: 590.1; xent: 6.4; lr: 0.00100; \
sents:    4093; bsz: 1021/1166/82;  988/1129 tok/s;     29 sec;
"""


def test_report_lines_give_the_target_tokens_per_second_of_each_window():
    assert peers.report_rates(LOG) == [4046.0, 1129.0]
    assert peers.median_after_first([9.0, 4.0, 6.0, 5.0]) == 5.0  # the first (warm-up) window left out
    assert peers.median_after_first([7.0]) == 7.0 and peers.median_after_first([]) == 0.0


def test_the_last_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    assert peers.last_checkpoint(tmp_path) is None
    for step in (900, 1000, 100):
        (tmp_path / f"model_step_{step}.pt").write_bytes(b"")
    assert peers.last_checkpoint(tmp_path).name == "model_step_1000.pt"


@pytest.mark.parametrize("feed", [True, False])
def test_the_peer_config_is_its_usual_recipe_at_our_size(tmp_path, feed):
    text = {r: {lang: tmp_path / f"{r}.{lang}" for lang in ("en", "de")} for r in ("train", "valid", "test")}
    conf = json.loads(peers.peer_config(tmp_path, text, tmp_path / "sp.model", "run", feed, 100).read_text())
    assert (conf["encoder_type"], conf["global_attention"], conf["rnn_type"]) == ("brnn", "general", "LSTM")
    assert (conf["hidden_size"], conf["layers"], conf["input_feed"]) == (256, 2, int(feed))
    assert (conf["optim"], conf["learning_rate"], conf["batch_type"], conf["batch_size"]) == (
        "adam",
        0.001,
        "tokens",
        3000,
    )
    assert conf["label_smoothing"] == 0.1 and conf["save_checkpoint_steps"] == 100
    assert conf["data"]["corpus_1"]["path_src"] == str(text["train"]["en"])


def test_both_sides_are_scored_alike_and_a_short_output_is_refused(tmp_path):
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.write_text("ein Hund läuft im Park .\nzwei Männer spielen Fußball .\n", encoding="utf-8")
    hyp.write_text("ein Hund läuft im Park .\nzwei Männer spielen Fußball .\n", encoding="utf-8")
    assert peers.score(hyp, ref) == {"bleu": 100.0, "chrf": 100.0}
    hyp.write_text("ein Hund läuft im Park .\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="1 lines for 2 references"):
        peers.score(hyp, ref)
