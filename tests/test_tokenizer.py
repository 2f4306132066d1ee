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


def test_unknown_characters_map_to_unk():
    tok = toklib.train_tokenizer(["a b c", "a b", "b c"] * 50, "bpe", 120)
    ids = toklib.encode(tok, ["a ☃ b"])[0]
    assert toklib.UNK_ID in ids
