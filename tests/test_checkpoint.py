"""The checkpoint's record of seen examples: exact, and small for large corpora."""

import io

import numpy as np

from pipeline.train.trainer import pack_ids, unpack_ids


def _ids(rng, files, lines, fraction):
    ids = [(f << 32) | np.flatnonzero(rng.random(lines) < fraction) for f in range(files)]
    return rng.permutation(np.concatenate(ids).astype(np.int64))


def test_packed_ids_round_trip_exactly():
    rng = np.random.default_rng(0)
    for ids in (
        _ids(rng, 3, 5000, 0.3),
        _ids(rng, 1, 17, 1.0),
        np.array([7 << 32, 5], np.int64),
        np.empty(0, np.int64),
        np.array([3, 3, 3], np.int64),
    ):
        assert np.array_equal(unpack_ids(pack_ids(ids)), np.unique(ids))


def test_a_million_seen_examples_cost_about_an_eighth_of_a_megabyte():
    """1M of 1.2M rows in 12 files seen: the record was 8 MB as int64 ids."""
    ids = _ids(np.random.default_rng(1), 12, 100_000, 0.84)
    assert 0.99e6 < len(ids) < 1.02e6
    buf = io.BytesIO()
    np.savez(buf, **pack_ids(ids))
    raw = io.BytesIO()
    np.save(raw, ids)
    print(
        f"\n[checkpoint] seen ids of {len(ids)} examples: {buf.tell() / 1e3:.0f} kB packed, "
        f"{raw.tell() / 1e6:.1f} MB as int64"
    )
    assert buf.tell() < 200_000
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        assert np.array_equal(unpack_ids(z), np.sort(ids))
