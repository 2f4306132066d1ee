"""Ray Data preprocessing on a real local Ray cluster."""

import gzip
import json

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data import tokenizer as toklib
from pipeline.data.output import read_tokenizers
from pipeline.data.readers import DataError
from pipeline.data.synthetic import generate_pairs
from pipeline.tasks import preprocess


def count_lines(path):
    with gzip.open(path, "rb") as f:
        return sum(1 for _ in f)


@pytest.mark.slow
def test_multi30k_counts_match_line_counts(ray_session, multi30k, tmp_path, capsys):
    cfg = load_config(
        ["data=multi30k", f"data.root={multi30k}", f"data.output_dir={tmp_path}", "data.vocab_size=4000"]
    ).data
    out, m = preprocess(cfg)
    expected = {
        s: count_lines(multi30k / f"{f}.en.gz")
        for s, f in (("train", "train"), ("val", "val"), ("test", "test_2016_flickr"))
    }
    assert expected == {"train": 29000, "val": 1014, "test": 1000}
    assert {s: m["splits"][s]["kept"] + sum(m["splits"][s]["dropped"].values()) for s in expected} == expected
    assert m["rows_read"] == sum(expected.values()) == m["rows_kept"] + sum(m["dropped"].values())
    table = pq.read_table(f"{out}/val")
    assert table.num_rows == m["splits"]["val"]["kept"]
    src_json, tgt_json = read_tokenizers(out)
    assert src_json == tgt_json and m["tokenizer"]["joint_vocab"]
    row = table.slice(0, 1).to_pylist()[0]
    assert toklib.decode(toklib.load_tokenizer(tgt_json), [row["tgt_ids"]]) == [row["tgt"]]
    # Every written row holds the ids the tokenizer itself gives its text (the word cache is exact).
    tok = toklib.load_tokenizer(tgt_json)
    for side in ("src", "tgt"):
        want = [e.ids for e in tok.encode_batch(table.column(side).to_pylist(), add_special_tokens=False)]
        assert table.column(f"{side}_ids").to_pylist() == want
        assert table.column(f"{side}_len").to_pylist() == [len(w) for w in want]
    # Same inputs and config: reused, not recomputed.
    out2, m2 = preprocess(cfg)
    assert out2 == out and m2 == m and "reusing" in capsys.readouterr().out


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"en": s, "de": t}) + "\n" for s, t in pairs))


@pytest.mark.slow
def test_bad_rows_strict_and_skip_with_exact_counts(ray_session, tmp_path):
    pairs = generate_pairs(400, seed=7)
    write_jsonl(tmp_path / "a.jsonl", pairs[:200])
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    lines[10] = "{broken"
    lines[20] = json.dumps({"en": "", "de": "leer"})
    lines[30] = json.dumps({"en": "x " * 400, "de": "y"})
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(tmp_path / "b.jsonl", pairs[200:] + pairs[200:210])  # 10 exact duplicates
    base = [
        "data=table",
        f"data.files={tmp_path}/*.jsonl",
        "data.src_column=en",
        "data.tgt_column=de",
        f"data.output_dir={tmp_path}/out",
        "data.vocab_size=300",
        "data.max_chars=300",
        "data.val_fraction=0.1",
        "data.test_fraction=0.1",
        "data.dedup=true",
    ]
    with pytest.raises(DataError, match=r"a\.jsonl:11: malformed JSON"):
        preprocess(load_config(base).data)
    out, m = preprocess(load_config(base + ["data.on_bad_rows=skip"]).data)
    assert m["rows_read"] == 410
    assert m["dropped"]["malformed"] == 1 and m["dropped"]["empty"] == 1 and m["dropped"]["too_long_chars"] == 1
    assert m["dropped"]["duplicate"] >= 10
    assert m["rows_read"] == m["rows_kept"] + sum(m["dropped"].values())
    kept = sum(pq.read_table(f"{out}/{s}").num_rows for s in ("train", "val", "test"))
    assert kept == m["rows_kept"] and m["splits"]["val"]["kept"] > 0 and m["splits"]["test"]["kept"] > 0


@pytest.mark.slow
def test_gzip_shard_pairs_by_uri(ray_session, multi30k, tmp_path):
    """Many shards per side, gzip, given as file:// URI globs: read in parallel, counted exactly."""
    src = gzip.open(multi30k / "val.en.gz", "rt", encoding="utf-8").read().splitlines()
    tgt = gzip.open(multi30k / "val.de.gz", "rt", encoding="utf-8").read().splitlines()
    bounds = [0, 300, 650, len(src)]
    for i in range(3):
        for side, lines in (("en", src), ("de", tgt)):
            with gzip.open(tmp_path / f"shard{i}.{side}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(lines[bounds[i] : bounds[i + 1]]) + "\n")
    cfg = load_config(
        [
            "data=pairs",
            f"data.src_files=file://{tmp_path}/shard*.en.gz",
            f"data.tgt_files=file://{tmp_path}/shard*.de.gz",
            f"data.output_dir={tmp_path}/out",
            "data.vocab_size=500",
            "data.val_fraction=0.1",
            "data.test_fraction=0.1",
        ]
    ).data
    out, m = preprocess(cfg)
    assert m["rows_read"] == len(src) == 1014
    assert m["rows_read"] == m["rows_kept"] + sum(m["dropped"].values())
    assert len(m["inputs"]) == 6
    ids = pq.read_table(f"{out}/train").column("id").to_pylist()
    assert len(set(ids)) == len(ids) == m["splits"]["train"]["kept"]
    # An interrupted earlier run left a shard and no manifest: the rerun does not read it as data.
    import shutil
    from pathlib import Path

    (Path(out) / "manifest.json").unlink()
    stray = Path(out) / "train" / "part-stray.parquet"
    shutil.copy(next((Path(out) / "val").glob("*.parquet")), stray)
    out2, m2 = preprocess(cfg)
    assert out2 == out and not stray.exists()
    assert {s: m2["splits"][s] for s in m2["splits"]} == {s: m["splits"][s] for s in m["splits"]}
    assert sum(pq.read_table(f"{out}/{s}").num_rows for s in ("train", "val", "test")) == m2["rows_kept"]


@pytest.mark.slow
def test_empty_corpus_is_refused_naming_the_files(ray_session, tmp_path):
    for lang in ("en", "de"):
        (tmp_path / f"part0.{lang}").write_text("")
        with gzip.open(tmp_path / f"part1.{lang}.gz", "wt") as f:
            f.write("\n\n")  # only empty lines: read, then all dropped as empty
    cfg = load_config(
        [
            "data=pairs",
            f"data.src_files={tmp_path}/part*.en*",
            f"data.tgt_files={tmp_path}/part*.de*",
            f"data.output_dir={tmp_path}/out",
        ]
    ).data
    with pytest.raises(DataError, match=r"no usable training pairs in the corpus \(.*part0\.en.*\): empty input"):
        preprocess(cfg)
