import numpy as np

from pipeline.train.batching import collate, plan_batches, token_batches


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    src_len = rng.integers(1, 40, n)
    tgt_len = rng.integers(1, 40, n)
    return {"src_len": src_len, "tgt_len": tgt_len, "id": np.arange(n),
            "src_ids": [rng.integers(4, 100, k) for k in src_len], "tgt_ids": [rng.integers(4, 100, k) for k in tgt_len]}


def test_budget_respected_and_each_row_once():
    r = rows(3000)
    batches = plan_batches(r["src_len"], r["tgt_len"], 800, np.random.default_rng(0))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(3000))
    for b in batches:
        width = max(max(r["tgt_len"][b]) + 1, max(r["src_len"][b]))
        assert width * len(b) <= 800 or len(b) == 1


def test_token_batches_over_two_workers_see_every_example_once():
    r = rows(5000, seed=1)
    halves = [np.arange(0, 5000, 2), np.arange(1, 5000, 2)]  # two shards, as streaming_split gives
    seen = []
    padded = real = 0
    for shard in halves:
        megas = [{k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in r.items()}
                 for idx in np.array_split(shard, 4)]
        for b in token_batches(iter(megas), 1000, 0, 2, 3, np.random.default_rng(0)):
            assert b.padded_tokens <= 1000 or b.src.size(0) == 1
            seen += b.ids.tolist()
            real += b.real_tokens
            padded += b.padded_tokens
    assert sorted(seen) == list(range(5000))
    assert real == int(sum(r["tgt_len"]) + 5000)  # + EOS per row
    assert 1 - real / padded < 0.15  # sorting by length keeps padding low


def test_collate_layout():
    b = collate([np.array([5, 6, 7]), np.array([8])], [np.array([9, 10]), np.array([11, 12, 13])], [7, 8], 0, 2, 3)
    assert b.src.tolist() == [[5, 6, 7], [8, 0, 0]] and b.src_lens.tolist() == [3, 1]
    assert b.tgt_in.tolist() == [[2, 9, 10, 0], [2, 11, 12, 13]]
    assert b.tgt_out.tolist() == [[9, 10, 3, 0], [11, 12, 13, 3]]
    assert b.real_tokens == 7 and b.padded_tokens == 8 and b.ids.tolist() == [7, 8]
