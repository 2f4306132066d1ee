"""Reviewing one training run: learning curves, BLEU by source length, the worst and best
test sentences, attention maps of a few sample translations. ``notebooks/review_run.ipynb``
shows these from MLflow; ``pipeline train`` logs the same figures to the run (``review/``)
at the end of its test, so the MLflow UI shows them too.

The test outputs are the run's ``test/outputs.json`` (every test sentence: source, reference,
translation), logged by the test decoding.
"""

from __future__ import annotations

import json
import math
import tempfile
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import metrics, tracking

OUTPUTS_FILE = "test/outputs.json"
FIGURES = ("learning_curves.png", "bleu_by_length.png", "attention.png")
LENGTH_EDGES = (0, 8, 11, 14, 18, 25)  # source words; the last bucket is open


def find_run(uri: str, run: str, experiment: str | None = None) -> Any:
    """A run by id, or by run name (``train.run_name``) in ``experiment``."""
    from mlflow.exceptions import MlflowException

    c = tracking.client(uri)
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        found = (
            c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run}'", max_results=1)
            if exp
            else []
        )
        if found:
            return found[0]
    try:
        return c.get_run(run)
    except MlflowException as e:
        where = f" in experiment '{experiment}'" if experiment else ""
        raise FileNotFoundError(f"no run with id or name '{run}'{where} at {tracking.redact(uri)}") from e


def test_outputs(uri: str, run_id: str) -> dict[str, list]:
    """The run's test outputs table as columns: source, reference, translation."""
    with tempfile.TemporaryDirectory(prefix="pipeline-review-") as tmp:
        path = tracking.client(uri).download_artifacts(run_id, OUTPUTS_FILE, tmp)
        with open(path) as f:
            table = json.load(f)
    return {k: [row[i] for row in table["data"]] for i, k in enumerate(table["columns"])}


def learning_curves(uri: str, run_id: str, metric: str = "val_bleu"):
    """Training loss and the validation metric over steps, side by side."""
    c = tracking.client(uri)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("train_loss", metric)):
        points = sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))
        if points:
            ax.plot(*zip(*points), marker="o" if key == metric else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key + ("" if points else " (not logged)"))
    fig.tight_layout()
    return fig


def length_buckets(outputs: dict[str, list], edges: tuple[int, ...] = LENGTH_EDGES) -> list[dict[str, Any]]:
    """Corpus BLEU of the test sentences grouped by source length in words."""
    lengths = [len(s.split()) for s in outputs["source"]]
    out = []
    for lo, hi in zip(edges, edges[1:] + (math.inf,)):
        idx = [i for i, n in enumerate(lengths) if lo <= n < hi]
        if idx:
            out.append(
                {
                    "bucket": f"{lo}-{hi - 1}" if hi != math.inf else f"{lo}+",
                    "sentences": len(idx),
                    "bleu": metrics.bleu(
                        [outputs["translation"][i] for i in idx], [outputs["reference"][i] for i in idx]
                    ),
                }
            )
    return out


def bleu_by_length(outputs: dict[str, list]):
    rows = length_buckets(outputs)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar([r["bucket"] for r in rows], [r["bleu"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.annotate(
            f"n={r['sentences']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
        )
    ax.set_xlabel("source length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title("test BLEU by source length")
    fig.tight_layout()
    return fig


def ranked_sentences(outputs: dict[str, list], k: int = 5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``k`` worst and ``k`` best test sentences by sentence BLEU (worst first, best first)."""
    scores = metrics.sentence_bleus(outputs["translation"], outputs["reference"])
    rows = [
        {"sentence_bleu": round(s, 2), "source": src, "reference": ref, "translation": hyp}
        for s, src, ref, hyp in zip(scores, outputs["source"], outputs["reference"], outputs["translation"])
    ]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["sentence_bleu"])
    return [rows[i] for i in order[:k]], [rows[i] for i in reversed(order[-k:])]


def attention_maps(items: list[dict[str, Any]]):
    """Attention of each output token over the source tokens (:meth:`Translator.attention`)."""
    n = max(1, len(items))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    for ax, item in zip(axes[0], items):
        w = np.asarray(item["weights"])
        ax.imshow(w, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(item["source"])), item["source"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(item["output"])), item["output"], fontsize=7)
        ax.set_xlabel("source")
        ax.set_ylabel("output")
    fig.tight_layout()
    return fig


def sample_sources(outputs: dict[str, list], k: int = 3) -> list[str]:
    """A few test sources for attention maps, spread over the split (short ones read best)."""
    picks = np.linspace(0, len(outputs["source"]) - 1, min(k, len(outputs["source"]))).astype(int)
    return [outputs["source"][i] for i in picks]


def figures(uri: str, run_id: str, outputs: dict[str, list], translator: Any, metric: str = "val_bleu") -> dict:
    """The review's figures by file name (the caller closes them)."""
    return {
        "learning_curves.png": learning_curves(uri, run_id, metric),
        "bleu_by_length.png": bleu_by_length(outputs),
        "attention.png": attention_maps(translator.attention(sample_sources(outputs))),
    }


def log_review(log: tracking.RunLogger, bundle: str, outputs: dict[str, list], metric: str) -> None:
    """The test outputs table, the worst and best sentences and the review's figures into the
    run (``review/``); the learning curves are left out when MLflow does not answer."""
    from .inference import Translator

    log.log_table(outputs, OUTPUTS_FILE)
    worst, best = ranked_sentences(outputs)
    rows = [{"kind": "worst", **r} for r in worst] + [{"kind": "best", **r} for r in best]
    log.log_table({k: [r[k] for r in rows] for k in rows[0]}, "review/worst_best.json")
    figs = {}
    try:
        figs["learning_curves.png"] = learning_curves(log.uri, log.run_id, metric)
    except Exception as e:
        if not tracking.is_outage(e):
            raise
        print(f"[review] MLflow is away: no learning curves in review/ ({tracking.redact(str(e))[:200]})", flush=True)
    figs["bleu_by_length.png"] = bleu_by_length(outputs)
    figs["attention.png"] = attention_maps(Translator.load(bundle).attention(sample_sources(outputs)))
    for name, fig in figs.items():
        log.log_figure(fig, f"review/{name}")
        plt.close(fig)
