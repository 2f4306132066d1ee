"""Subword tokenizers (HF ``tokenizers``, BPE or unigram) trained on the corpus, saved as JSON.

Text is split on whitespace with a metaspace marker, so decoding restores the cleaned
text exactly (detokenised BLEU needs that). Special ids are fixed: 0 pad, 1 unk, 2 bos,
3 eos, the same in every tokenizer this project writes.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import chain, repeat
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def clean_text(text: str, normalization: str, lowercase: bool) -> str:
    """The one text cleaning, shared by preprocessing and inference so that a model
    sees at translation time exactly what it saw in training."""
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = " ".join(text.split())  # the same as re.sub(r"\s+", " ", ...).strip() for every code point
    return text.lower() if lowercase else text


def clean_texts(texts: list[str], normalization: str, lowercase: bool) -> list[str]:
    """``clean_text`` over a batch, the same strings: one normalisation call for the whole
    batch, joined at newlines (a code point that never combines with its neighbours, so
    each line normalises as it would alone; text that holds newlines itself goes line by line)."""
    if normalization != "none":
        joined = "\n".join(texts)
        if not unicodedata.is_normalized(normalization, joined):
            lines = unicodedata.normalize(normalization, joined).split("\n")
            texts = lines if len(lines) == len(texts) else [unicodedata.normalize(normalization, t) for t in texts]
    out = [" ".join(t.split()) for t in texts]
    return [t.lower() for t in out] if lowercase else out


PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int) -> Tokenizer:
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2, show_progress=False
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
        )
    else:
        raise ValueError(f"unknown tokenizer '{kind}' (bpe, unigram)")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise AssertionError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)


def load_tokenizer(json_text: str) -> Tokenizer:
    return Tokenizer.from_str(json_text)


def encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast: the same ids without character offsets (tokenizers >= 0.20).
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


class WordEncoder:
    """Encodes text word by word from a cache of each word's ids: the same ids as
    ``Tokenizer.encode`` (tested on all of Multi30k), several times faster on real text.

    Exact because this project's tokenizers have no normaliser and split text at spaces with
    a metaspace marker before the subword model sees it, so the ids of a sentence are those
    of its words one after another, whatever the model (BPE or unigram). Each distinct word
    goes through the tokenizer once, in a batch of the words not seen before; a sentence
    costs a few dictionary look-ups (word frequencies are Zipfian, so the cache hits almost
    always). Rows the rule does not cover are passed to the tokenizer whole: text that is
    empty or has leading, trailing or double spaces (``clean_text`` output never does), and
    words holding a special token's text (``<s>``) or the marker (U+2581). A tokenizer of
    another shape (a user's own, say) is used as it is for every row.
    """

    MAX_WORDS = 100_000  # cache bound (about 32 MB): emptied when full, by a corpus's long tail of rare words

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        spec = json.loads(tok.to_str())
        pre = spec.get("pre_tokenizer") or {}
        self.exact = (
            spec.get("normalizer") is None
            and (spec.get("model") or {}).get("type") in ("BPE", "Unigram")
            and pre.get("type") == "Metaspace"
            and pre.get("replacement") == "\u2581"
            and pre.get("prepend_scheme") == "always"
            and pre.get("split", True)
        )
        # Words the rule does not cover: those holding an added token's text (split out before
        # the pre-tokenizer) or the metaspace marker itself (a leading one stops the marker
        # being prepended to the word on its own, which it is within a sentence).
        self.unsafe_text = [t["content"] for t in spec.get("added_tokens") or []] + ["\u2581"]
        self.unsafe: set[str] = set()
        self._clear()

    def _clear(self) -> None:
        # Word i's ids are values[starts[i]:starts[i] + lens[i]]: numpy, so that a batch's
        # ids are gathered in one indexing operation rather than word by word in Python.
        self.index: dict[str, int] = {}
        self.values, self.starts, self.lens = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)

    def _whole(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _learn(self, words: set[str]) -> None:
        new = [w for w in words.difference(self.index) if w not in self.unsafe]
        self.unsafe.update(w for w in new if any(a in w for a in self.unsafe_text))
        new = [w for w in new if w not in self.unsafe]
        if not new:
            return
        if len(self.index) + len(new) > self.MAX_WORDS:
            self._clear()
            new = [w for w in words if w not in self.unsafe]
        ids = self._whole(new)
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        self.starts = np.concatenate([self.starts, len(self.values) + np.cumsum(lens) - lens])
        self.lens = np.concatenate([self.lens, lens])
        self.values = np.concatenate([self.values, np.fromiter(chain.from_iterable(ids), np.int32, int(lens.sum()))])
        self.index.update(zip(new, range(len(self.index), len(self.index) + len(new))))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(values int32 (N tokens,), offsets int64 (len(texts) + 1,)): row i's ids are
        ``values[offsets[i]:offsets[i + 1]]``, ready for an Arrow ``ListArray``."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(1, np.int64)
        words = " ".join(texts).split(" ") if self.exact else [""]
        uniq = set(words)
        if "" not in uniq:
            self._learn(uniq)
        if "" in uniq or not uniq.issubset(self.index.keys()):  # some row is not covered by the word rule
            return _flatten(self.encode(texts))
        word = np.fromiter(map(self.index.__getitem__, words), np.int64, len(words))
        lens = self.lens[word]
        ends = np.cumsum(lens)
        # token p of word j (ends[j] - lens[j] <= p < ends[j]) is values[starts[j] + p - (ends[j] - lens[j])]
        values = self.values[np.arange(ends[-1]) - np.repeat(ends - lens - self.starts[word], lens)]
        spaces = np.fromiter(map(str.count, texts, repeat(" ")), np.int64, len(texts))
        offsets = np.zeros(len(texts) + 1, np.int64)
        offsets[1:] = ends[np.cumsum(spaces + 1) - 1]
        return values, offsets

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not self.exact:
            return self._whole(texts)
        split = [t.split(" ") for t in texts]
        self._learn({w for words in split if "" not in words for w in words})
        # After learning, a word is cached unless it is unsafe: such rows go whole.
        return [
            [x for w in words for x in self._ids(w)] if all(w in self.index for w in words) else self._whole([t])[0]
            for t, words in zip(texts, split)
        ]

    def _ids(self, word: str) -> list[int]:
        j = self.index[word]
        return self.values[self.starts[j] : self.starts[j] + self.lens[j]].tolist()


def _flatten(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1])), offsets


def decode(tok: Tokenizer, ids: list[list[int]]) -> list[str]:
    return tok.decode_batch(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class Vocab:
    """What a model needs of the preprocessed data: vocabulary sizes, the special ids and,
    for a captioner, its input (``video``: the manifest's kind, shape, feature_dim). Travels
    to the workers and into a bundle's model.json as a plain dict."""

    src_vocab_size: int
    tgt_vocab_size: int
    joint_vocab: bool
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    video: dict[str, Any] | None = None

    @property
    def specials(self) -> tuple[int, int, int]:
        return self.pad_id, self.bos_id, self.eos_id

    @classmethod
    def of(cls, manifest: dict[str, Any], **extra: Any) -> Vocab:
        tok = manifest["tokenizer"]
        return cls(tok["src_vocab_size"], tok["tgt_vocab_size"], tok["joint_vocab"], **extra)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def model_args(self) -> dict[str, Any]:
        """The keyword arguments of ``build_model`` that come from the data."""
        return asdict(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not (k == "video" and v is None)}
