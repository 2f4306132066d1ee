"""Decode benchmark: batched greedy and beam search (sentences/s) vs decoding one sentence
at a time, with the same model on the same sentences, side by side in one process.

    python bench/decode.py MODEL_BUNDLE DATA_DIR [--split test --beam 4 --sentences 300]

MODEL_BUNDLE is a run's best/ folder; DATA_DIR a preprocessed output folder.
"""

from __future__ import annotations

import argparse
import json
import time

import pyarrow.parquet as pq
import torch

from pipeline.inference import Translator, decode_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("data_dir")
    ap.add_argument("--split", default="test")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    tr = Translator.load(args.bundle)
    rows = pq.read_table(f"{args.data_dir}/{args.split}").slice(0, args.sentences).to_pydict()
    src = [list(x) for x in rows["src_ids"]]
    dev = torch.device("cpu")
    out = {"bench": "decode", "sentences": len(src), "threads": torch.get_num_threads()}
    for name, beam in (("greedy", 1), (f"beam{args.beam}", args.beam)):
        t0 = time.perf_counter()
        batched = decode_ids(tr.model, src, beam, 0.6, args.batch, dev)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [decode_ids(tr.model, [s], beam, 0.6, 1, dev)[0] for s in src]
        t_single = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(batched, single)) / len(src)
        out[name] = {
            "batched_sent_per_s": round(len(src) / t_batched, 1),
            "single_sent_per_s": round(len(src) / t_single, 1),
            "ratio_batched_over_single": round(t_single / t_batched, 2),
            "identical_outputs": round(same, 3),
        }
    print(json.dumps(out))
    print(
        f"decode: greedy {out['greedy']['batched_sent_per_s']} sent/s ({out['greedy']['ratio_batched_over_single']}x one-at-a-time), "
        f"beam{args.beam} {out[f'beam{args.beam}']['batched_sent_per_s']} sent/s "
        f"({out[f'beam{args.beam}']['ratio_batched_over_single']}x)"
    )


if __name__ == "__main__":
    main()
