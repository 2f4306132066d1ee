"""The report's and the run review's pieces that need no MLflow: the heatmap's axis order,
BLEU by source length, the worst and best sentences, the attention figure, run links."""

import math

import numpy as np
import pytest

from pipeline import report, review


def rows(cells):
    return [
        {"run_name": f"t{i}", "run_id": f"r{i}", "params": {"model.hidden_size": h, "model.num_layers": d}, "best": b}
        for i, (h, d, b) in enumerate(cells)
    ]


def test_heatmap_axes_sort_numerically():
    sweep = {
        "rows": rows([(128, 2, 3.0), (96, 10, 2.0), (1024, 1, 1.0), (96, 2, 4.0)]),
        "metric": "val_bleu",
        "mode": "max",
    }
    fig = report.heatmap(sweep)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["96", "128", "1024"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "10"]
    grid = np.asarray(ax.images[0].get_array())
    assert grid[1, 0] == 4.0 and grid[1, 1] == 3.0 and grid[2, 0] == 2.0 and grid[0, 2] == 1.0
    assert math.isnan(grid[0, 0])


OUTPUTS = {
    "source": ["a b", "a b c d e f g h i", "one two three four five six seven eight nine ten eleven twelve", "x y z"],
    "reference": ["the dog runs .", "a man rides a red bike .", "two women sit on a bench in the park .", "a cat ."],
    "translation": ["the dog runs .", "a man rides a bike .", "people stand .", "a cat ."],
}


def test_length_buckets_score_each_group():
    buckets = review.length_buckets(OUTPUTS, edges=(0, 5, 10))
    assert [(b["bucket"], b["sentences"]) for b in buckets] == [("0-4", 2), ("5-9", 1), ("10+", 1)]
    assert buckets[0]["bleu"] == pytest.approx(100.0)
    assert 0 <= buckets[2]["bleu"] < buckets[1]["bleu"] < 100


def test_ranked_sentences_worst_and_best():
    worst, best = review.ranked_sentences(OUTPUTS, k=2)
    assert worst[0]["translation"] == "people stand ." and worst[1]["translation"] == "a man rides a bike ."
    assert {b["translation"] for b in best} == {"the dog runs .", "a cat ."}
    assert best[0]["sentence_bleu"] == pytest.approx(100.0) and worst[0]["sentence_bleu"] < 20


def test_attention_figure_labels_tokens():
    item = {"source": ["▁a", "▁dog"], "output": ["▁ein", "▁Hund", "</s>"], "weights": np.eye(3, 2), "translation": "x"}
    ax = review.attention_maps([item, item]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["▁a", "▁dog"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["▁ein", "▁Hund", "</s>"]


def test_run_link_is_the_ui_page_of_a_server_only():
    assert report.run_link("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert report.run_link("sqlite:////tmp/mlflow.db", "3", "abc") == "abc"
    assert "pw" not in report.run_link("https://me:pw@mlflow.example/", "1", "r")
