"""Evaluation metrics.

Translation metrics on detokenised text (sacreBLEU): corpus BLEU and chrF, 0-100.

Captioning metrics as the COCO caption evaluation (pycocoevalcap) reports them, as fractions:
BLEU-4, ROUGE-L and CIDEr-D reimplemented in pure Python (no Java), on text tokenised by
``caption_tokens`` (an approximation of COCO's PTB tokenisation); METEOR, which is itself a Java
program, only through pycocoevalcap when Java is installed. ``caption_scores`` runs them all.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import sys
import threading
from collections import Counter
from typing import Any

import sacrebleu

# force=True: references are the corpus text as given; sacreBLEU's guess that text
# ending in " ." was tokenised is wrong for corpora written that way (the demo corpus).
_BLEU = sacrebleu.BLEU(force=True)
_CHRF = sacrebleu.CHRF()


def bleu(hyps: list[str], refs: list[str]) -> float:
    return float(_BLEU.corpus_score(hyps, [refs]).score) if hyps else 0.0


def sentence_bleus(hyps: list[str], refs: list[str]) -> list[float]:
    """BLEU of each sentence alone; effective order, else a short sentence without a 4-gram
    match scores 0 whatever it got right."""
    return [float(_SENTENCE_BLEU.sentence_score(h, [r]).score) for h, r in zip(hyps, refs)]


_SENTENCE_BLEU = sacrebleu.BLEU(force=True, effective_order=True)


def chrf(hyps: list[str], refs: list[str]) -> float:
    return float(_CHRF.corpus_score(hyps, [refs]).score) if hyps else 0.0


# --- captioning: tokenisation -------------------------------------------------------------

# PTB splits clitics off ("don't" -> "do n't", "dog's" -> "dog 's") and COCO then drops the
# punctuation tokens (. , ' " ? ! : ; - -- ... brackets). Everything else is kept as PTB keeps it.
_CAPTION_TOKEN = re.compile(
    r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|m|d)\b"  # clitics
    r"|(?:[^\W\d_]\.){2,}"  # abbreviations keep their dots: u.s. p.m.
    r"|\w+(?:(?:[-./]|'(?!(?:s|re|ve|ll|m|d)\b))\w+)*"  # inner - . / ': t-shirt 3.5 o'clock
    r"|[^\w\s.,?!:;'\"`()\[\]{}\-]"  # other symbols (& $ % #) stand alone
)


def caption_tokens(text: str) -> list[str]:
    """Lowercased word tokens of a caption, punctuation removed, like COCO's PTB tokeniser."""
    return _CAPTION_TOKEN.findall(text.lower())


# --- captioning: BLEU-4, ROUGE-L, CIDEr-D on space-separated tokens ------------------------

_N = 4  # n-gram orders 1..4 for BLEU-4 and CIDEr
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing: 0 matches stay ~0, no 0-division
_BETA = 1.2  # ROUGE-L recall weight in pycocoevalcap
_SIGMA = 6.0  # CIDEr-D length penalty width


def _check(hyps: list[str], refs: list[list[str]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    if not all(refs):
        raise ValueError("every hypothesis needs at least one reference")


def _ngrams(tokens: list[str]) -> Counter[tuple[str, ...]]:
    """Counts of all 1..4-grams of a token list."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, _N + 1) for i in range(len(tokens) - k + 1))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _closest_len(ref_lens: list[int], hyp_len: int) -> int:
    # Ties go to the shorter reference, as pycocoevalcap's min over (distance, length) does.
    return min(ref_lens, key=lambda n: (abs(n - hyp_len), n))


def bleu4(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 of tokenised captions as pycocoevalcap's Bleu(4): clipped n-gram counts and
    the "closest" reference length summed over the corpus, one brevity penalty for the corpus."""
    _check(hyps, refs)
    if not hyps:
        return 0.0
    correct, guess = [0] * _N, [0] * _N
    hyp_total = ref_total = 0
    for hyp, rs in zip(hyps, refs):
        h, r_toks = hyp.split(), [r.split() for r in rs]
        max_ref: Counter[tuple[str, ...]] = Counter()
        for r in r_toks:
            max_ref |= _ngrams(r)  # union keeps each n-gram's largest count in any reference
        for gram, count in _ngrams(h).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(_N):
            guess[k] += max(0, len(h) - k)
        hyp_total += len(h)
        ref_total += _closest_len([len(r) for r in r_toks], len(h))
    score = 1.0
    for c, g in zip(correct, guess):
        score *= (c + _TINY) / (g + _SMALL)
    score **= 1.0 / _N
    ratio = (hyp_total + _TINY) / (ref_total + _SMALL)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one DP row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l_one(hyp: str, refs: list[str]) -> float:
    # split(" ") as pycocoevalcap does: an empty caption is one empty token, never 0 long.
    h = hyp.split(" ")
    pairs = [(_lcs(h, r), len(r)) for r in (ref.split(" ") for ref in refs)]
    prec = max(lcs / len(h) for lcs, _ in pairs)
    rec = max(lcs / n for lcs, n in pairs)  # best precision and recall may come from two refs
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + _BETA**2) * prec * rec / (rec + _BETA**2 * prec)


def rouge_l(hyps: list[str], refs: list[list[str]]) -> float:
    """ROUGE-L F (beta 1.2) of tokenised captions as pycocoevalcap's Rouge, mean over items."""
    _check(hyps, refs)
    return _mean([_rouge_l_one(h, rs) for h, rs in zip(hyps, refs)])


_Vec = tuple[list[dict[tuple[str, ...], float]], list[float]]


def _tfidf(counts: Counter[tuple[str, ...]], df: Counter[tuple[str, ...]], log_n: float) -> _Vec:
    """Per-order tf-idf weights and their norms; an n-gram no reference has gets df 1."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(_N)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
    return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]


def _cider_sim(hyp: _Vec, ref: _Vec, delta: int) -> float:
    """Mean over orders of the clipped cosine similarity, times the gaussian length penalty."""
    (h_vec, h_norm), (r_vec, r_norm) = hyp, ref
    total = 0.0
    for k in range(_N):
        if h_norm[k] and r_norm[k]:  # a zero vector shares nothing
            # CIDEr-D clipping: a hyp n-gram's weight counts at most its weight in the reference
            ref_w = r_vec[k]
            dot = sum(min(w, ref_w.get(g, 0.0)) * ref_w.get(g, 0.0) for g, w in h_vec[k].items())
            total += dot / (h_norm[k] * r_norm[k])
    return total / _N * math.exp(-(delta**2) / (2 * _SIGMA**2))


def cider_d(hyps: list[str], refs: list[list[str]]) -> float:
    """CIDEr-D of tokenised captions as pycocoevalcap's Cider (x10, not x100), mean over items.

    Document frequencies come from the references of this set: an n-gram's df is the number of
    items whose references contain it, so the score depends on the whole set evaluated."""
    _check(hyps, refs)
    if not hyps:
        return 0.0
    ref_toks = [[r.split() for r in rs] for rs in refs]
    ref_counts = [[_ngrams(r) for r in rts] for rts in ref_toks]
    df = Counter(g for rcs in ref_counts for g in set().union(*rcs))
    log_n = math.log(len(refs))
    scores = []
    for hyp, rts, rcs in zip(hyps, ref_toks, ref_counts):
        h = hyp.split()
        h_vec = _tfidf(_ngrams(h), df, log_n)
        # Word-count difference; pycocoevalcap counts bigrams, which differs only when one side
        # is empty, and then the similarity is 0 anyway.
        sims = [_cider_sim(h_vec, _tfidf(rc, df, log_n), len(h) - len(rt)) for rt, rc in zip(rts, rcs)]
        scores.append(10.0 * _mean(sims))
    return _mean(scores)


# --- captioning: METEOR (optional, Java) ---------------------------------------------------

_METEOR_TIMEOUT_S = 300.0  # the Java scorer blocks on a pipe; kill it rather than hang forever


def _close_meteor(scorer: Any) -> None:
    proc = scorer.meteor_p
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        with contextlib.suppress(OSError):  # unflushed input to a dead process: nothing to save
            pipe.close()
    # Its __del__ takes this lock, which a compute_score that raised leaves held: gc would hang.
    if scorer.lock.locked():
        scorer.lock.release()


def meteor(hyps: list[str], refs: list[list[str]]) -> float | None:
    """METEOR 1.5 via pycocoevalcap; None when Java or pycocoevalcap is missing or it fails."""
    _check(hyps, refs)
    if shutil.which("java") is None:
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    if not hyps:
        return 0.0
    try:
        scorer = Meteor()
    except Exception as e:
        print(f"[metrics] METEOR unavailable: {e!r}", file=sys.stderr)
        return None
    watchdog = threading.Timer(_METEOR_TIMEOUT_S, scorer.meteor_p.kill)
    watchdog.start()
    try:
        gts = {i: list(rs) for i, rs in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        return float(scorer.compute_score(gts, res)[0])
    except Exception as e:
        print(f"[metrics] METEOR failed: {e!r}", file=sys.stderr)
        return None
    finally:
        watchdog.cancel()
        _close_meteor(scorer)


def caption_scores(hyps: list[str], refs: list[list[str]], with_meteor: bool = False) -> dict[str, float]:
    """BLEU-4, ROUGE-L, CIDEr-D (and METEOR when asked and available) on caption_tokens text;
    hyps[i] is scored against the reference captions refs[i]."""
    _check(hyps, refs)
    hyp_t = [" ".join(caption_tokens(h)) for h in hyps]
    ref_t = [[" ".join(caption_tokens(r)) for r in rs] for rs in refs]
    scores = {"bleu4": bleu4(hyp_t, ref_t), "rouge_l": rouge_l(hyp_t, ref_t), "cider": cider_d(hyp_t, ref_t)}
    if with_meteor and (m := meteor(hyp_t, ref_t)) is not None:
        scores["meteor"] = m
    return scores
