"""Translation: sentence pairs (Multi30k, shard pairs, tables) -> a text-to-text model."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.output import Preprocessed
from ..data.tokenizer import Vocab
from .base import Task


class TranslationTask(Task):
    name = "translation"
    metric = "val_bleu"
    val_scores = ("bleu", "chrf")
    eval_columns = ("id", "src_ids", "tgt_ids", "src", "tgt")
    test_columns = ("id", "src", "tgt")
    test_batch_size = 256
    unit = "sentences"
    digits = 2

    def preprocess(self, data_cfg: Any, force: bool = False) -> Preprocessed:
        from ..data.preprocess import preprocess_text

        return preprocess_text(data_cfg, force)

    def check_inputs(self, data_cfg: Any) -> str:
        from ..data.readers import list_tasks

        return f"{len(list_tasks(data_cfg))} input file(s) or file pair(s) found"

    def batches(self, mega_batches, batch_tokens, specials, rng, pin, skip):
        from ..train.batching import token_batches

        return token_batches(mega_batches, batch_tokens, *specials, rng, pin=pin, skip=skip)

    def blank_batch(self, vocab: Vocab) -> Any:
        from ..train.batching import collate

        eos = np.array([vocab.eos_id])
        return collate([eos], [eos], [-1], *vocab.specials)

    def eval_rows(self, model, rows, beam_size, length_penalty, device, with_loss):
        from ..inference import decode_ids
        from ..train.batching import collate

        specials = (model.pad_id, model.bos_id, model.eos_id)
        n, size = len(rows["id"]), 64
        batches = (
            (
                collate(
                    rows["src_ids"][s : s + size], rows["tgt_ids"][s : s + size], rows["id"][s : s + size], *specials
                )
                for s in range(0, n, size)
            )
            if with_loss
            else None
        )
        hyp_ids = decode_ids(model, [list(x) for x in rows["src_ids"]], beam_size, length_penalty, size, device)
        return {"id": rows["id"], "src": rows["src"], "ref": rows["tgt"], "hyp_ids": hyp_ids, "batches": batches}

    def scores(self, hyp: list[str], ref: list[Any], final: bool = False) -> dict[str, float]:
        from .. import metrics

        return {"bleu": metrics.bleu(hyp, ref), "chrf": metrics.chrf(hyp, ref)}

    def usage(self, bundle: str) -> str:
        return f"echo 'a sentence' | pipeline translate --model {bundle}"

    def decoder(self) -> type:
        return TranslateBatch

    def sample_table(self, res: dict[str, list], picks: list[int]) -> tuple[dict[str, list], str]:
        table = {
            "source": [res["src"][i] for i in picks],
            "reference": [res["tgt"][i] for i in picks],
            "translation": [res["hyp"][i] for i in picks],
        }
        return table, "samples/test_translations.json"

    def model_example(self, cfg: Any, data_dir: str, res: dict[str, list]) -> list[str]:
        return res.get("src", [])[:2] or ["a sentence ."]


class TranslateBatch:
    """Ray Data actor: translate the ``src`` text column with a model bundle (its own
    tokenizer, so any model can be scored on any preprocessed split)."""

    def __init__(self, bundle: str, beam_size: int, length_penalty: float):
        import torch

        from ..inference import Translator

        self.tr = Translator.load(bundle, "cuda" if torch.cuda.is_available() else "cpu")
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hyps = self.tr.translate(list(batch["src"]), self.beam_size, self.length_penalty)
        return {"id": batch["id"], "src": batch["src"], "tgt": batch["tgt"], "hyp": np.array(hyps, dtype=object)}
