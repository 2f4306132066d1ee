import gzip
import itertools

import pytest

from pipeline.data import tokenizer as toklib


@pytest.mark.slow
def test_round_trip_on_multi30k(multi30k):
    with gzip.open(multi30k / "train.de.gz", "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in itertools.islice(f, 3000)]
    for kind in ("bpe", "unigram"):
        tok = toklib.train_tokenizer(lines, kind, 1000)
        assert [tok.id_to_token(i) for i in range(4)] == toklib.SPECIALS
        ids = toklib.encode(tok, lines[:500])
        assert toklib.decode(tok, ids) == lines[:500]
        assert sum(map(len, ids)) > sum(len(line.split()) for line in lines[:500])  # real subwords
        # Saved as JSON and loaded again: same ids.
        again = toklib.load_tokenizer(tok.to_str())
        assert toklib.encode(again, lines[:50]) == ids[:50]
        # encode() uses encode_batch_fast: the same ids as the full encode_batch.
        assert ids == [e.ids for e in tok.encode_batch(lines[:500], add_special_tokens=False)]


def test_clean_text_collapses_every_unicode_space_like_the_regex():
    import re
    import sys

    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert len(spaces) > 20  # tabs, newlines, NBSP, ideographic space, ...
    for c in spaces:
        text = f"{c}a{c}{c}b c{c}"
        assert toklib.clean_text(text, "none", False) == re.sub(r"\s+", " ", text).strip() == "a b c"
    assert toklib.clean_text("  Ｆｕｌｌ\u00a0Width ", "NFKC", True) == "full width"


def test_unknown_characters_map_to_unk():
    tok = toklib.train_tokenizer(["a b c", "a b", "b c"] * 50, "bpe", 120)
    ids = toklib.encode(tok, ["a ☃ b"])[0]
    assert toklib.UNK_ID in ids


def _multi30k_lines(multi30k, lang):
    with gzip.open(multi30k / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_word_encoder_gives_the_tokenizers_ids_on_all_of_multi30k(multi30k, kind):
    """The word cache is exact: every training sentence of all four languages, cleaned as
    preprocessing cleans it, gets the ids ``Tokenizer.encode`` gives."""
    for lang in ("en", "de", "fr", "cs"):
        lines = toklib.clean_texts(_multi30k_lines(multi30k, lang), "NFC", False)
        tok = toklib.train_tokenizer(lines[:5000], kind, 2000)  # unseen words in the rest: the cache must learn them
        want = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
        enc = toklib.WordEncoder(tok)
        for start in range(0, len(lines), 7000):  # batches: the cache carries over
            values, offsets = enc.encode_flat(lines[start : start + 7000])
            got = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
            assert got == want[start : start + 7000], (lang, kind, start)
        assert enc.encode(lines[:300]) == want[:300]


def test_word_encoder_passes_rows_outside_the_word_rule_to_the_tokenizer():
    tok = toklib.train_tokenizer(["a dog runs", "the dog", "a cat </s> runs"] * 50, "bpe", 200)
    texts = [
        "a dog",
        " a dog",
        "a  dog",
        "a dog ",
        "",
        "a </s> dog",
        "dog<s>",
        "a\tdog",
        "Ünïcode ☃",
        "a \u2581 dog",
        "\u2581a dog",
        "a \u2581dog",
        "a d\u2581og",
    ]
    want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert [tok.decode(w) for w in want[:1]] == ["a dog"]
    enc = toklib.WordEncoder(tok)
    assert enc.encode(texts) == want
    values, offsets = enc.encode_flat(texts)
    assert [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))] == want
    # Well-formed rows after a special token's text was seen still take the fast path, and agree.
    values, offsets = enc.encode_flat(["a dog runs", "the cat"])
    assert [values[offsets[i] : offsets[i + 1]].tolist() for i in range(2)] == [
        e.ids for e in tok.encode_batch(["a dog runs", "the cat"], add_special_tokens=False)
    ]
    # A tokenizer of another shape (a normaliser, here) is used whole, never word by word.
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    enc = toklib.WordEncoder(tok)
    assert not enc.exact
    assert enc.encode(["A Dog"]) == [tok.encode("A Dog", add_special_tokens=False).ids] == enc.encode(["a dog"])


def test_clean_texts_equals_clean_text_row_by_row(multi30k):
    tricky = [
        "e\u0301t\u00e9",
        "\u0301starts with a combining mark",
        "two\nlines",
        "  Ｆｕｌｌ\u00a0Width ",
        "",
        "x\u2028y",
        "\ufb01ne ligature",
        "Å vs A\u030a",
        "tab\tand\u3000ideographic",
    ]
    for lang in ("de", "cs"):
        lines = _multi30k_lines(multi30k, lang)[:3000] + tricky
        for form in ("NFC", "NFKC", "NFD", "none"):
            for lower in (False, True):
                assert toklib.clean_texts(lines, form, lower) == [toklib.clean_text(t, form, lower) for t in lines]
