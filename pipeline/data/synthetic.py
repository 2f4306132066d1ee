"""Synthetic English -> pseudo-German parallel corpus: the embedded default data (data=demo_text).

It must work offline and be learnable yet non-trivial for an LSTM encoder-decoder with
attention, so the target is an invented language with real structure: grammatical gender,
case (nom/acc/dat) and number agreement on articles and adjectives, plural suffixes that
depend on gender, adjectives after the noun, verb-second main clauses with a separable particle
or auxiliary + participle at the end, and verb-final subordinate clauses. The translation is a
pure function of the source sentence, so a perfect model reaches BLEU 100. `write_demo_text`
writes the Multi30k raw layout ({split}.{lang}.gz) so the normal loader reads it unchanged.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import random
import tempfile
from dataclasses import dataclass

# The language must not depend on the corpus seed: every split and every run share one lexicon.
_LEXICON_SEED = 20240611
MIN_LEN, MAX_LEN = 4, 25  # tokens, final "." included; checked on both sides

# Source lemmas were chosen so that English inflection stays regular (-s, -es, -ed) and no
# word is both a noun and a verb, which keeps the source -> target mapping unambiguous.
NOUNS = (
    "dog",
    "cat",
    "bird",
    "horse",
    "cow",
    "boy",
    "girl",
    "friend",
    "teacher",
    "doctor",
    "farmer",
    "student",
    "king",
    "queen",
    "baker",
    "singer",
    "driver",
    "house",
    "car",
    "tree",
    "book",
    "door",
    "window",
    "table",
    "chair",
    "garden",
    "street",
    "river",
    "road",
    "flower",
    "apple",
    "bottle",
    "cup",
    "hat",
    "shirt",
    "shoe",
    "ball",
    "letter",
    "picture",
    "song",
    "boat",
    "train",
    "bike",
    "ship",
    "lamp",
    "key",
    "bag",
    "coat",
    "cake",
    "egg",
    "town",
    "mountain",
    "lake",
    "forest",
    "field",
    "village",
    "market",
    "school",
    "park",
    "bridge",
    "tower",
    "room",
    "kitchen",
    "bed",
)
ADJS = (
    "big",
    "small",
    "old",
    "young",
    "new",
    "good",
    "bad",
    "happy",
    "sad",
    "tall",
    "short",
    "long",
    "quiet",
    "loud",
    "warm",
    "cold",
    "fast",
    "slow",
    "clean",
    "dirty",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "brown",
    "grey",
    "pink",
    "orange",
)
TRANS = (
    "watch",
    "visit",
    "follow",
    "help",
    "paint",
    "open",
    "push",
    "pull",
    "kick",
    "kiss",
    "call",
    "wash",
    "touch",
    "want",
    "need",
    "like",
    "love",
    "hate",
    "miss",
    "count",
    "check",
    "fix",
    "greet",
    "thank",
    "cook",
    "lift",
    "fill",
    "climb",
    "reach",
    "protect",
    "collect",
    "repair",
    "deliver",
)
INTRANS = (
    "wait",
    "laugh",
    "dance",
    "work",
    "play",
    "jump",
    "walk",
    "rest",
    "listen",
    "shout",
    "smile",
    "cough",
    "yawn",
    "arrive",
    "stay",
    "return",
)
ADVS = (
    "quickly",
    "slowly",
    "often",
    "today",
    "again",
    "carefully",
    "quietly",
    "happily",
    "loudly",
    "together",
    "early",
    "later",
)
PREPS = ("in", "on", "with", "near", "behind", "under", "without", "beside")
NUMS = ("two", "three", "four", "five", "six")
NAMES = ("anna", "tom", "maria", "paul", "lena", "max", "sofia", "ben")  # copied verbatim, like real MT
CONJS = ("because", "while", "although")

# Closed-class morphology is a fixed table (a learner needs a small, regular paradigm);
# index = case: 0 nominative (subject), 1 accusative (object), 2 dative (after a preposition).
_DEF = {"m": ("lo", "lon", "lom"), "f": ("la", "la", "lar"), "n": ("le", "le", "lem"), "pl": ("li", "li", "lin")}
_INDEF = {"m": ("en", "enen", "enem"), "f": ("ena", "ena", "ener"), "n": ("en", "en", "enem")}
_ADJ_END = {"m": ("er", "en", "em"), "f": ("a", "a", "ar"), "n": ("es", "es", "em"), "pl": ("i", "i", "in")}
_PLURAL = {"m": "e", "f": "en", "n": "er"}
_CASE = {"nom": 0, "acc": 1, "dat": 2}
_AUX = ("hav", "havan")  # singular, plural
_PARTICLES = ("ap", "tor", "ume", "fal")

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "dr",
    "fl",
    "gr",
    "kr",
    "pl",
    "schl",
    "st",
    "tr",
    "sch",
]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "au", "ei", "ä", "ö", "ü"]  # plain vowels twice as likely
_CODAS = [
    "l",
    "m",
    "n",
    "r",
    "s",
    "t",
    "k",
    "nd",
    "rt",
    "lk",
    "ng",
    "ch",
]  # stems end in a consonant so suffixes attach


@dataclass(frozen=True)
class Lexicon:
    nouns: dict[str, tuple[str, str]]  # source noun -> (target stem, gender m/f/n)
    adjs: dict[str, str]  # source adjective -> target stem
    verbs: dict[str, tuple[str, str]]  # source verb -> (separable particle or "", target stem)
    words: dict[str, str]  # invariant words: adverbs, prepositions, numbers, conjunctions


def _build_lexicon() -> Lexicon:
    rng = random.Random(_LEXICON_SEED)
    taken = {w for table in (_DEF, _INDEF, _ADJ_END) for forms in table.values() for w in forms}
    taken |= set(_AUX) | set(_PARTICLES) | set(NAMES)

    def word(syllables: int = 0) -> str:  # 0: a content word of one or two syllables
        syllables = syllables or rng.choice((1, 2, 2))
        while True:  # distinct stems, so no two lemmas share a target word
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
            w += rng.choice(_CODAS)
            if w not in taken:
                taken.add(w)
                return w

    nouns = {n: (word(), rng.choice("mfn")) for n in NOUNS}
    adjs = {a: word() for a in ADJS}
    verbs = {v: (rng.choice(_PARTICLES) if rng.random() < 0.3 else "", word()) for v in TRANS + INTRANS}
    words = {w: word(1) for w in PREPS + NUMS + CONJS}
    words |= {w: word() for w in ADVS}
    return Lexicon(nouns, adjs, verbs, words)


LEXICON = _build_lexicon()


@dataclass(frozen=True)
class NP:
    noun: str  # source noun lemma, or a name
    det: str = "the"  # "the", "a", a number word, or "" for a name
    adj: str | None = None
    plural: bool = False


@dataclass(frozen=True)
class Clause:
    subj: NP
    verb: str
    obj: NP | None = None
    adv: str | None = None
    pp: tuple[str, NP] | None = None  # (preposition, its object)
    past: bool = False


def _np(np: NP, case: str) -> tuple[list[str], list[str]]:
    if np.noun in NAMES:
        return [np.noun], [np.noun]
    stem, gender = LEXICON.nouns[np.noun]
    agr, c = ("pl" if np.plural else gender), _CASE[case]
    src = ([np.adj] if np.adj else []) + [np.noun + ("s" if np.plural else "")]
    if np.det == "a":
        src.insert(0, "an" if src[0][0] in "aeiou" else "a")
        det = _INDEF[gender][c]
    else:
        src.insert(0, np.det)
        det = _DEF[agr][c] if np.det == "the" else LEXICON.words[np.det]
    tgt = [det, stem + (_PLURAL[gender] if np.plural else "")]
    if np.adj:
        tgt.append(LEXICON.adjs[np.adj] + _ADJ_END[agr][c])
    return src, tgt


def _en_verb(verb: str, past: bool, plural: bool) -> str:
    if past:
        return verb + ("d" if verb.endswith("e") else "ed")
    if plural:
        return verb
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x")) else "s")


def _clause(cl: Clause, subordinate: bool) -> tuple[list[str], list[str]]:
    subj_s, subj_t = _np(cl.subj, "nom")
    src, middle = subj_s + [_en_verb(cl.verb, cl.past, cl.subj.plural)], []
    if cl.obj:
        obj_s, obj_t = _np(cl.obj, "acc")
        src, middle = src + obj_s, obj_t
    if cl.adv:
        src.append(cl.adv)
    if cl.pp:
        pp_s, pp_t = _np(cl.pp[1], "dat")
        src += [cl.pp[0]] + pp_s
        middle += [LEXICON.words[cl.pp[0]]] + pp_t
    adv = [LEXICON.words[cl.adv]] if cl.adv else []
    particle, stem = LEXICON.verbs[cl.verb]
    if cl.past:
        finite, last = _AUX[cl.subj.plural], particle + "ge" + stem + "o"
    else:
        finite, last = stem + ("an" if cl.subj.plural else "et"), particle
    if subordinate:  # verb-final; a separable particle re-attaches to its verb
        end = [last, finite] if cl.past else [particle + finite]
        return src, subj_t + adv + middle + end
    return src, subj_t + [finite] + adv + middle + ([last] if last else [])


def realize(main: Clause, conj: str | None = None, sub: Clause | None = None) -> tuple[str, str]:
    """Source and target sentence for a main clause with an optional subordinate clause."""
    src, tgt = _clause(main, subordinate=False)
    if conj and sub:
        sub_s, sub_t = _clause(sub, subordinate=True)
        src += [conj] + sub_s
        tgt += [",", LEXICON.words[conj]] + sub_t
    return " ".join(src + ["."]), " ".join(tgt + ["."])


def _random_np(rng: random.Random) -> NP:
    r = rng.random()
    if r < 0.12:
        return NP(rng.choice(NAMES), det="")
    noun, adj = rng.choice(NOUNS), (rng.choice(ADJS) if rng.random() < 0.4 else None)
    if r < 0.27:
        return NP(noun, rng.choice(NUMS), adj, plural=True)
    if r < 0.5:
        return NP(noun, "a", adj)
    return NP(noun, "the", adj, plural=rng.random() < 0.3)


def _random_clause(rng: random.Random) -> Clause:
    transitive = rng.random() < 0.65
    return Clause(
        subj=_random_np(rng),
        verb=rng.choice(TRANS if transitive else INTRANS),
        obj=_random_np(rng) if transitive else None,
        adv=rng.choice(ADVS) if rng.random() < 0.3 else None,
        pp=(rng.choice(PREPS), _random_np(rng)) if rng.random() < 0.4 else None,
        past=rng.random() < 0.35,
    )


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (source, target) sentence pairs, a pure function of `seed`."""
    rng, pairs = random.Random(seed), []
    while len(pairs) < n:
        main = _random_clause(rng)
        sub = rng.random() < 0.35
        pair = realize(main, rng.choice(CONJS), _random_clause(rng)) if sub else realize(main)
        # Rejection keeps both sides in range without biasing the grammar itself.
        if all(MIN_LEN <= len(s.split()) <= MAX_LEN for s in pair):
            pairs.append(pair)
    return pairs


def split_seed(seed: int, split: str) -> int:
    """Independent sub-seed per split, so val/test are fresh samples rather than train's prefix."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{split}".encode()).digest()[:8], "big")


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    # A reader (or a concurrent writer on a shared root) must never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


_README = """# demo_text: synthetic English -> pseudo-German corpus

Generated offline by `pipeline.data.synthetic` (seed {seed}; same seed, identical files).
Multi30k raw layout `{{split}}.{{lang}}.gz`: UTF-8, one sentence per line, line i of `{src}`
translates line i of `{tgt}`. Sizes: train {train}, val {val}, test {test}; {lo} to {hi} tokens.

The target language is invented (syllable words, {lemmas} lemmas) but shaped like German:
gendered nouns, articles and adjective endings that agree in gender, number and case, plural
suffixes by gender, adjectives after the noun, verb-second main clauses with a separable particle
or auxiliary + participle at the end, and verb-final clauses after because/while/although.
Names are copied. Translation is a function of the source, so a perfect model scores BLEU 100.
"""


def write_demo_text(
    root: str | os.PathLike,
    n_train: int = 20000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 1234,
    src_lang: str = "en",
    tgt_lang: str = "de",
) -> pathlib.Path:
    """Write train/val/test gzip files in the Multi30k raw layout plus README.md under `root`."""
    if src_lang == tgt_lang:
        raise ValueError(f"src_lang and tgt_lang must differ, both are {src_lang!r}")
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        pairs = generate_pairs(n, split_seed(seed, split))
        for lang, side in ((src_lang, 0), (tgt_lang, 1)):
            text = "".join(pair[side] + "\n" for pair in pairs)
            # mtime=0 makes the bytes reproducible, so files can be checksummed and cached.
            _atomic_write(root / f"{split}.{lang}.gz", gzip.compress(text.encode(), mtime=0))
    lemmas = sum(map(len, (NOUNS, ADJS, TRANS, INTRANS, ADVS, PREPS, NUMS, NAMES, CONJS)))
    readme = _README.format(seed=seed, src=src_lang, tgt=tgt_lang, lemmas=lemmas, lo=MIN_LEN, hi=MAX_LEN, **sizes)
    _atomic_write(root / "README.md", readme.encode())
    return root
