import numpy as np

from pipeline.tasks.captioning import caption_batches
from pipeline.train.batching import collate, plan_batches, token_batches


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    src_len = rng.integers(1, 40, n)
    tgt_len = rng.integers(1, 40, n)
    return {
        "src_len": src_len,
        "tgt_len": tgt_len,
        "id": np.arange(n),
        "src_ids": [rng.integers(4, 100, k) for k in src_len],
        "tgt_ids": [rng.integers(4, 100, k) for k in tgt_len],
    }


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
        megas = [
            {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in r.items()}
            for idx in np.array_split(shard, 4)
        ]
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


def test_skip_leaves_out_examples_trained_before_a_resume():
    r = {k: (np.asarray(v) if isinstance(v, np.ndarray) else np.array(v, dtype=object)) for k, v in rows(400).items()}
    skip = np.arange(0, 400, 3)
    ids = [i for b in token_batches(iter([r]), 500, 0, 2, 3, skip=skip) for i in b.ids.tolist()]
    assert sorted(ids) == [i for i in range(400) if i % 3]


def video_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    caps = [[rng.integers(4, 50, int(rng.integers(3, 12))) for _ in range(int(rng.integers(1, 7)))] for _ in range(n)]
    data = [np.full((4, 8, 8, 3), i, np.uint8).tobytes() for i in range(n)]
    return {
        "id": np.arange(n),
        "data": np.array(data, dtype=object),
        "dtype": np.array(["uint8"] * n, dtype=object),
        "shape": np.array([np.array([4, 8, 8, 3])] * n, dtype=object),
        "caption_ids": np.array(caps, dtype=object),
    }


def test_caption_batches_encode_each_clip_once_and_see_every_pair_once():
    r = video_rows(60)
    want = {i * 1024 + j for i in range(60) for j in range(len(r["caption_ids"][i]))}
    seen = []
    for b in caption_batches(iter([r]), 300, 0, 2, 3, np.random.default_rng(1)):
        clips = b.src[:, 0, 0, 0, 0].tolist()
        assert len(set(clips)) == len(clips)  # a clip appears once per batch, however many captions
        for row, pair in enumerate(b.ids.tolist()):
            assert clips[b.src_index[row]] == pair // 1024  # each caption points at its own clip
        assert b.tgt_in.numel() <= 300 or len(clips) == 1
        seen += b.ids.tolist()
    assert sorted(seen) == sorted(want)
    skip = np.array(sorted(want)[::4])
    rest = [i for b in caption_batches(iter([r]), 300, 0, 2, 3, skip=skip) for i in b.ids.tolist()]
    assert sorted(rest) == sorted(want - set(skip.tolist()))


def _write_split(folder, table, shards=2):
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    step = -(-table.num_rows // shards)
    for i in range(shards):
        pq.write_table(table.slice(i * step, step), folder / f"part-{i}.parquet")


def test_target_tokens_count_every_target_and_its_end_token(tmp_path):
    import pyarrow as pa

    from pipeline.tasks import CaptioningTask, TranslationTask

    lens = np.arange(1, 11, dtype=np.int32)  # 55 tokens in 10 targets
    _write_split(tmp_path / "text" / "train", pa.table({"id": np.arange(10), "tgt_len": lens}))
    assert TranslationTask().target_tokens(str(tmp_path / "text")) == 55 + 10
    caps = [[[5, 6, 7], [8]], [[9, 9]], [[4] * 6, [4], [4, 4]]]  # 3 videos, 6 captions, 15 tokens
    _write_split(tmp_path / "video" / "train", pa.table({"id": [0, 1, 2], "caption_ids": caps}))
    assert CaptioningTask().target_tokens(str(tmp_path / "video")) == 15 + 6


def test_batch_tokens_and_max_epochs_zero_are_sized_from_the_corpus(capsys):
    from pipeline.config import TrainConfig
    from pipeline.train.run import resolve_from_corpus

    def auto(tokens, pairs=6000, **kw):
        t = TrainConfig(**{"batch_tokens": 0, "max_epochs": 0, **kw})
        resolve_from_corpus(t, tokens, pairs)
        return t.batch_tokens, t.max_epochs

    assert auto(52_800) == (800, 60)  # the demo video corpus: what its recipe was tuned at
    out = capsys.readouterr().out
    assert "train.batch_tokens=0 (from the corpus): 800, for 52,800 target tokens in the training split: 33" in out
    assert "train.max_epochs=0 (from the corpus): 60, for 6,000 training examples" in out
    assert auto(29_400, 3000) == (450, 120)  # 600 clips: smaller batches, more epochs
    assert auto(52_800, accumulate=2) == (400, 60)
    assert auto(52_800, num_workers=1) == (1500, 60)  # 1600, above the most
    assert auto(5_000_000, 400_000) == (1500, 20)  # a large corpus: the text default, the fewest epochs
    assert auto(2_000, 200) == (200, 300)  # a tiny one: still whole captions, the most epochs
    t, _ = TrainConfig(batch_tokens=800, max_epochs=7), capsys.readouterr()
    resolve_from_corpus(t, 29_400, 3000)
    assert (t.batch_tokens, t.max_epochs) == (800, 7) and capsys.readouterr().out == ""  # numbers are kept
