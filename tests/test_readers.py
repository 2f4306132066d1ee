"""Readers on small files written here: formats, alignment, bad input named by file and line."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.readers import DataError, list_tasks, read_pair, read_table


def rows_of(gen):
    out = {"src": [], "tgt": [], "reason": [], "id": []}
    for b in gen:
        for k in out:
            out[k] += b[k]
    return out


def pair_task(src, tgt):
    return {"kind": "pair", "src_path": str(src), "tgt_path": str(tgt), "split": "", "file_index": 3}


def test_pairs_plain_and_gzip_with_bom_and_crlf(tmp_path):
    (tmp_path / "a.en").write_bytes("\ufeffhello world\r\nsecond line\r\n".encode())
    with gzip.open(tmp_path / "a.de.gz", "wb") as f:
        f.write(b"hallo welt\nzweite zeile\n")
    r = rows_of(read_pair(pair_task(tmp_path / "a.en", tmp_path / "a.de.gz"), skip=False))
    assert r["src"] == ["hello world", "second line"] and r["tgt"] == ["hallo welt", "zweite zeile"]
    assert r["id"] == [(3 << 32) | 1, (3 << 32) | 2]


def test_misaligned_pair_names_both_files_and_counts(tmp_path):
    (tmp_path / "x.en").write_text("a\nb\nc\n")
    (tmp_path / "x.de").write_text("a\nb\n")
    with pytest.raises(DataError) as e:
        rows_of(read_pair(pair_task(tmp_path / "x.en", tmp_path / "x.de"), skip=True))
    msg = str(e.value)
    assert "x.en has 3 lines" in msg and "x.de has 2 lines" in msg


def test_invalid_utf8_strict_names_line_and_skip_counts(tmp_path):
    (tmp_path / "u.en").write_bytes(b"ok\nbad \xff here\nfine\n")
    (tmp_path / "u.de").write_bytes(b"ok\nschlecht\ngut\n")
    with pytest.raises(DataError, match=r"u\.en:2: invalid UTF-8"):
        rows_of(read_pair(pair_task(tmp_path / "u.en", tmp_path / "u.de"), skip=False))
    r = rows_of(read_pair(pair_task(tmp_path / "u.en", tmp_path / "u.de"), skip=True))
    assert r["reason"] == ["", "invalid_utf8", ""] and r["src"][2] == "fine"


def test_truncated_gzip_is_named(tmp_path):
    data = gzip.compress(("line\n" * 5000).encode())
    (tmp_path / "t.en.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "t.de.gz").write_bytes(data)
    with pytest.raises(DataError, match=r"t\.en\.gz: cannot read"):
        rows_of(read_pair(pair_task(tmp_path / "t.en.gz", tmp_path / "t.de.gz"), skip=False))


def table_task(path):
    return {"kind": "table", "src_path": str(path), "tgt_path": "", "split": "", "file_index": 0}


def test_tsv_with_and_without_header(tmp_path):
    (tmp_path / "h.tsv").write_text("en\tde\nhello\thallo\n")
    (tmp_path / "n.tsv").write_text("hello\thallo\nshort\n")
    r = rows_of(read_table(table_task(tmp_path / "h.tsv"), "en", "de", skip=False))
    assert (r["src"], r["tgt"]) == (["hello"], ["hallo"])
    with pytest.raises(DataError, match=r"n\.tsv:2: expected at least 2 tab-separated fields, got 1"):
        rows_of(read_table(table_task(tmp_path / "n.tsv"), "en", "de", skip=False))


def test_jsonl_malformed_and_wrong_columns(tmp_path):
    lines = [json.dumps({"en": "a", "de": "b"}), "{not json", json.dumps({"en": "a", "fr": "c"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: malformed JSON"):
        rows_of(read_table(table_task(tmp_path / "c.jsonl"), "en", "de", skip=False))
    r = rows_of(read_table(table_task(tmp_path / "c.jsonl"), "en", "de", skip=True))
    assert r["reason"] == ["", "malformed", "malformed"]


def test_parquet_columns(tmp_path):
    pq.write_table(pa.table({"en": ["a", "b"], "de": ["x", "y"]}), tmp_path / "p.parquet")
    r = rows_of(read_table(table_task(tmp_path / "p.parquet"), "en", "de", skip=False))
    assert r["tgt"] == ["x", "y"]
    with pytest.raises(DataError, match=r"missing column\(s\) \['src'\]; the file has \['en', 'de'\]"):
        rows_of(read_table(table_task(tmp_path / "p.parquet"), "src", "de", skip=False))


def test_list_tasks_errors(tmp_path):
    with pytest.raises(DataError, match="data.root '/nonexistent/x' does not exist"):
        list_tasks(load_config(["data=multi30k", "data.root=/nonexistent/x"]).data)
    (tmp_path / "train.en").write_text("a\n")
    with pytest.raises(DataError, match=r"missing file .*/train\.de\[\.gz\]"):
        list_tasks(load_config(["data=multi30k", f"data.root={tmp_path}"]).data)
    with pytest.raises(DataError, match="no input files match"):
        list_tasks(
            load_config(["data=pairs", f"data.src_files={tmp_path}/*.xx", f"data.tgt_files={tmp_path}/*.yy"]).data
        )
    for i in range(3):
        (tmp_path / f"s{i}.en").write_text("a\n")
    (tmp_path / "s0.de").write_text("a\n")
    with pytest.raises(DataError, match="matches 3 files but data.tgt_files matches 1"):
        list_tasks(
            load_config(["data=pairs", f"data.src_files={tmp_path}/s*.en", f"data.tgt_files={tmp_path}/s*.de"]).data
        )


def test_pairs_across_chunk_boundaries(tmp_path, monkeypatch):
    """Lines are read and decoded a chunk at a time: line numbers, ids, the BOM, CRLF and the
    misalignment count stay right across chunks."""
    from pipeline.data import readers

    monkeypatch.setattr(readers, "CHUNK", 3)
    src = [f"line {i}" for i in range(1, 11)]
    (tmp_path / "c.en").write_bytes(("\ufeff" + "\r\n".join(src) + "\r\n").encode())  # BOM, CRLF
    with gzip.open(tmp_path / "c.de.gz", "wb") as f:
        f.write(("\n".join(f"zeile {i}" for i in range(1, 11))).encode())  # last line without newline
    r = rows_of(read_pair(pair_task(tmp_path / "c.en", tmp_path / "c.de.gz"), skip=False))
    assert r["src"] == src and r["tgt"] == [f"zeile {i}" for i in range(1, 11)]
    assert r["id"] == [(3 << 32) | i for i in range(1, 11)]
    # A bad byte on line 8 (third chunk) is named by its line; skipped, only that row is dropped.
    (tmp_path / "u.en").write_bytes("\n".join(src[:7] + ["bad \xff"] + src[8:]).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"u\.en:8: invalid UTF-8"):
        rows_of(read_pair(pair_task(tmp_path / "u.en", tmp_path / "c.de.gz"), skip=False))
    r = rows_of(read_pair(pair_task(tmp_path / "u.en", tmp_path / "c.de.gz"), skip=True))
    assert [i for i, x in enumerate(r["reason"]) if x] == [7] and r["src"][8] == "line 9"
    # One line more in a later chunk: both counts in full.
    (tmp_path / "m.de").write_text("\n".join(f"z {i}" for i in range(1, 12)) + "\n")
    with pytest.raises(DataError, match=r"c\.en has 10 lines but .*m\.de has 11 lines"):
        rows_of(read_pair(pair_task(tmp_path / "c.en", tmp_path / "m.de"), skip=False))


@pytest.mark.parametrize(
    "text,line,width",
    [
        ("hello\thallo\na tab\tinside\tthe sentence\n", 2, 2),  # no header: exactly source and target
        ("id\ten\tde\n1\thello\thallo\n2\tx\ty\textra\n", 3, 3),  # a header names 3 columns
    ],
)
def test_tsv_line_with_more_fields_is_named_or_counted(tmp_path, text, line, width):
    """Fields 0 and 1 of such a line were taken: a tab inside a sentence misaligned it silently."""
    (tmp_path / "m.tsv").write_text(text)
    with pytest.raises(DataError, match=rf"m\.tsv:{line}: expected {width} tab-separated fields .*got {width + 1}"):
        rows_of(read_table(table_task(tmp_path / "m.tsv"), "en", "de", skip=False))
    r = rows_of(read_table(table_task(tmp_path / "m.tsv"), "en", "de", skip=True))
    assert r["reason"] == ["", "too_many_fields"] and r["src"][0] == "hello"
