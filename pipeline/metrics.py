"""Translation metrics on detokenised text (sacreBLEU): corpus BLEU and chrF, 0-100."""

from __future__ import annotations

import sacrebleu

# force=True: references are the corpus text as given; sacreBLEU's guess that text
# ending in " ." was tokenised is wrong for corpora written that way (the demo corpus).
_BLEU = sacrebleu.BLEU(force=True)
_CHRF = sacrebleu.CHRF()


def bleu(hyps: list[str], refs: list[str]) -> float:
    return float(_BLEU.corpus_score(hyps, [refs]).score) if hyps else 0.0


def chrf(hyps: list[str], refs: list[str]) -> float:
    return float(_CHRF.corpus_score(hyps, [refs]).score) if hyps else 0.0
