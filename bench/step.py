"""Step benchmark: our model and training step vs the bare PyTorch loop of bench/bare_loop.py,
same architecture and size, on identical batches, measured side by side in one process.

Batches are drawn once (lengths from a Multi30k-like distribution, the same batches for
both) and the two steps alternate in rounds so that machine noise hits both equally.
Prints JSON and a one-line summary with the ratio (ours / bare, target tokens per second).

    python bench/step.py [--hidden 256 --layers 2 --vocab 8000 --batch 64 --steps 20 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_loop import BareSeq2Seq, bare_step, pad

from pipeline.config import ModelConfig
from pipeline.models import build_model
from pipeline.train.batching import collate, plan_batches
from pipeline.train.trainer import batch_flops, train_step


def make_rows(n: int, vocab: int, rng: np.random.Generator):
    src_len = np.clip(rng.normal(14, 5, n).astype(int), 2, 40)
    tgt_len = np.clip((src_len * rng.normal(1.1, 0.15, n)).astype(int), 2, 45)
    return [rng.integers(4, vocab, k) for k in src_len], [rng.integers(4, vocab, k) for k in tgt_len]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--emb", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=64, help="sentences per bare batch; ours gets the same tokens")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    src, tgt = make_rows(n, args.vocab, rng)

    # The bare loop: random batches of `batch` sentences, padded, full logits.
    bare_batches = []
    for i in range(0, n, args.batch):
        s, t = src[i : i + args.batch], tgt[i : i + args.batch]
        bare_batches.append((pad(s), torch.tensor([len(x) for x in s]), pad(t, prefix=[2]), pad(t, suffix=[3])))
    # Ours: the same sentences, length-sorted and cut by the same total token budget.
    budget = int(np.mean([b[3].numel() for b in bare_batches]))
    ours_batches = [
        collate([src[i] for i in idx], [tgt[i] for i in idx], idx, 0, 2, 3)
        for idx in plan_batches(np.array([len(x) for x in src]), np.array([len(x) for x in tgt]), budget)
    ]
    real_tokens = sum(len(x) + 1 for x in tgt)

    ours = build_model(
        model_cfg=ModelConfig(
            embedding_size=args.emb,
            hidden_size=args.hidden,
            num_layers=args.layers,
            dropout=0.2,
            attention="dot",
            tie_embeddings=True,
        ),
        src_vocab_size=args.vocab,
        tgt_vocab_size=args.vocab,
    )
    bare = BareSeq2Seq(args.vocab, args.emb, args.hidden, args.layers, 0.2)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_bare = torch.optim.Adam(bare.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def run_ours() -> None:
        for b in ours_batches:
            opt_ours.zero_grad(set_to_none=True)
            train_step(ours, b, 1.0, float(b.real_tokens), 1, 0.1, scaler, None)
            torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
            opt_ours.step()

    def run_bare() -> None:
        for s, lens, t_in, t_out in bare_batches:
            bare_step(bare, opt_bare, s, lens, t_in, t_out, label_smoothing=0.1)

    times = {"ours": [], "bare": []}
    run_ours(), run_bare()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("bare", run_bare), ("ours", run_ours)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tps = {k: real_tokens / min(v) for k, v in times.items()}
    flops = sum(batch_flops(ours, b, 0) for b in ours_batches)  # the same sentences, real tokens only
    padded = {"bare": sum(b[3].numel() for b in bare_batches), "ours": sum(b.padded_tokens for b in ours_batches)}
    out = {
        "bench": "step",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "target_tokens": real_tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "padding_fraction": {k: round(1 - real_tokens / v, 3) for k, v in padded.items()},
        "model_tflops": {k: round(flops / min(v) / 1e12, 4) for k, v in times.items()},
        "ratio_ours_over_bare": round(tps["ours"] / tps["bare"], 3),
    }
    print(json.dumps(out))
    print(
        f"step: ours {tps['ours']:.0f} vs bare {tps['bare']:.0f} target tokens/s -> {out['ratio_ours_over_bare']:.2f}x"
    )


if __name__ == "__main__":
    main()
