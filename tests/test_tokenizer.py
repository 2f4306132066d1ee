import gzip
import itertools

from pipeline.data import tokenizer as toklib


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
