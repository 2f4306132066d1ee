"""Tests for the synthetic demo corpus: determinism, file layout, and the grammar it promises."""

import gzip
import statistics

from pipeline.data.synthetic import (
    CONJS,
    LEXICON,
    MAX_LEN,
    MIN_LEN,
    NP,
    Clause,
    generate_pairs,
    realize,
    split_seed,
    write_demo_text,
)


def _noun_of_gender(gender: str) -> str:
    return next(n for n, (_, g) in sorted(LEXICON.nouns.items()) if g == gender)


def _plain_verb() -> str:
    return next(v for v, (particle, _) in sorted(LEXICON.verbs.items()) if not particle)


def _separable_verb() -> str:
    return next(v for v, (particle, _) in sorted(LEXICON.verbs.items()) if particle)


def test_same_seed_same_pairs_and_different_seed_differs():
    assert generate_pairs(300, 7) == generate_pairs(300, 7)
    assert generate_pairs(300, 7) != generate_pairs(300, 8)
    assert len(generate_pairs(0, 7)) == 0


def test_translation_is_a_function_of_the_source_across_seeds():
    seen: dict[str, str] = {}
    for seed in (1, 2, 3):
        for src, tgt in generate_pairs(4000, seed):
            assert seen.setdefault(src, tgt) == tgt, src


def test_written_files_are_aligned_and_match_the_generator(tmp_path):
    sizes = {"train": 300, "val": 40, "test": 25}
    root = write_demo_text(
        tmp_path / "demo", sizes["train"], sizes["val"], sizes["test"], seed=5, src_lang="en", tgt_lang="xx"
    )
    assert root == tmp_path / "demo"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["README.md"] + [f"{s}.{lang}.gz" for s in sizes for lang in ("en", "xx")]
    )  # no temp files left behind
    assert "demo_text" in (root / "README.md").read_text()
    for split, n in sizes.items():
        src = gzip.decompress((root / f"{split}.en.gz").read_bytes()).decode("utf-8").splitlines()
        tgt = gzip.decompress((root / f"{split}.xx.gz").read_bytes()).decode("utf-8").splitlines()
        assert len(src) == len(tgt) == n
        assert list(zip(src, tgt)) == generate_pairs(n, split_seed(5, split))


def test_rewriting_is_byte_identical(tmp_path):
    a = write_demo_text(tmp_path / "a", 50, 10, 10, seed=9)
    b = write_demo_text(tmp_path / "b", 50, 10, 10, seed=9)
    for name in ("train.en.gz", "train.de.gz", "test.de.gz"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_articles_and_adjectives_agree_with_gender_number_and_case():
    fem, masc = _noun_of_gender("f"), _noun_of_gender("m")
    verb = _plain_verb()  # no particle, so token positions are fixed

    def tgt(clause: Clause) -> list[str]:
        return realize(clause)[1].split()

    def sentence(noun: str, plural: bool = False) -> Clause:
        return Clause(
            NP(noun, adj="red", plural=plural),
            verb,
            obj=NP(noun, adj="red", plural=plural),
            pp=("in", NP(noun, plural=plural)),
        )

    f, m = tgt(sentence(fem)), tgt(sentence(masc))
    # Same template, only the noun's gender differs: subject article, object article, adjective
    # endings and the dative article after the preposition all change.
    assert f[0] != m[0]
    assert f[4] != m[4]
    assert f[2] != m[2] and f[6] != m[6]
    assert f[-3] != m[-3]
    # Case: the masculine article differs between subject, object and prepositional object.
    assert len({m[0], m[4], m[-3]}) == 3
    # Number: plural changes the article and the noun's suffix depends on gender.
    fp, mp = tgt(sentence(fem, plural=True)), tgt(sentence(masc, plural=True))
    assert fp[0] == mp[0] != m[0]
    f_stem, m_stem = LEXICON.nouns[fem][0], LEXICON.nouns[masc][0]
    assert fp[1].startswith(f_stem) and mp[1].startswith(m_stem)
    assert fp[1][len(f_stem) :] != mp[1][len(m_stem) :] != ""
    src = realize(sentence(masc, plural=True))[0].split()
    assert src[2] == masc + "s"


def test_adjective_follows_the_noun_in_the_target():
    noun = _noun_of_gender("n")
    src, tgt = realize(Clause(NP(noun, adj="green"), "wait"))
    assert src.split()[1:3] == ["green", noun]
    assert tgt.split()[1] == LEXICON.nouns[noun][0]
    assert tgt.split()[2].startswith(LEXICON.adjs["green"])


def test_subordinate_clause_is_verb_final_and_main_clause_is_verb_second():
    verb = _separable_verb()
    particle, stem = LEXICON.verbs[verb]
    clause = Clause(NP("anna", det=""), verb, obj=NP(_noun_of_gender("f")), adv="often", pp=("near", NP("tom", det="")))
    src, tgt = realize(clause, "because", clause)
    s, t = src.split(), tgt.split()
    assert s[1] == s[s.index("because") + 2]  # English: verb right after the subject, both times
    main, sub = t[: t.index(",")], t[t.index(",") + 2 :]
    assert main[1] == stem + "et" and main[-1] == particle  # V2, particle at the clause end
    assert sub[-2] == particle + stem + "et"  # verb-final, particle re-attached
    assert sub[-3] == "tom"  # the prepositional phrase precedes the verb

    past = realize(Clause(NP("anna", det=""), verb, obj=NP("tom", det=""), past=True))[1].split()
    assert past[-2].startswith(particle) and stem in past[-2]  # participle at the end
    assert past[1] != past[-2]  # auxiliary in second position


def test_every_generated_subordinate_clause_ends_in_a_verb():
    verb_forms = set()
    for verb in LEXICON.verbs:
        for plural in (False, True):
            for past in (False, True):
                clause = Clause(NP("max", det="", plural=plural), verb, past=past)
                verb_forms.add(realize(clause, "while", clause)[1].split()[-2])
    conj_words = {LEXICON.words[c] for c in CONJS}
    n_sub = 0
    for src, tgt in generate_pairs(2000, 11):
        if any(c in src.split() for c in CONJS):
            n_sub += 1
            t = tgt.split()
            assert t[-2] in verb_forms, tgt
            assert t[t.index(",") + 1] in conj_words
    assert n_sub > 300  # the optional clause is actually common


def test_vocabulary_sizes_and_lengths_are_sensible():
    pairs = generate_pairs(5000, 1234)
    src_vocab = {w for s, _ in pairs for w in s.split()}
    tgt_vocab = {w for _, t in pairs for w in t.split()}
    assert 150 <= sum(map(len, (LEXICON.nouns, LEXICON.adjs, LEXICON.verbs, LEXICON.words))) <= 250
    stems = [s for s, _ in LEXICON.nouns.values()] + list(LEXICON.adjs.values())
    stems += [s for _, s in LEXICON.verbs.values()] + list(LEXICON.words.values())
    assert len(set(stems)) == len(stems)  # invented words, one lemma each
    assert set(stems).isdisjoint(w for s, _ in pairs for w in s.split())  # not copies of English
    assert 250 <= len(src_vocab) <= 600
    assert 350 <= len(tgt_vocab) <= 1200
    assert all(w.isalpha() or w in ".," for w in tgt_vocab)
    src_lens = [len(s.split()) for s, _ in pairs]
    tgt_lens = [len(t.split()) for _, t in pairs]
    assert min(src_lens + tgt_lens) >= MIN_LEN and max(src_lens + tgt_lens) <= MAX_LEN
    assert 7 <= statistics.mean(src_lens) <= 14
    assert max(src_lens) >= 20 and min(src_lens) <= 5  # varied lengths, not one template
    assert all(s.endswith(" .") and t.endswith(" .") for s, t in pairs)
    assert all(s == s.lower() and "  " not in s for s, _ in pairs)


def test_val_and_test_rarely_repeat_train():
    train = set(generate_pairs(20000, split_seed(1234, "train")))
    for split in ("val", "test"):
        held_out = generate_pairs(500, split_seed(1234, split))
        overlap = sum(pair in train for pair in held_out) / len(held_out)
        assert overlap < 0.05, (split, overlap)
