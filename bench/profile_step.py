"""Where a training step's time goes: our Trainer's step at the default model and batch on
Multi30k-like batches, split into forward, backward and optimizer (clip + AdamW), the
forward's and backward's operators grouped (LSTM, output layer + loss, attention, embedding,
the rest), and the gradient allreduce that 2 workers add, measured over gloo between two
processes on this machine. Prints JSON and a table of shares.

    python bench/profile_step.py [--threads 1 --batch-tokens 1500 --steps 30]

One thread is what each of the default 2 workers has on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import make_rows

from pipeline.config import ModelConfig, TrainConfig
from pipeline.models import build_model
from pipeline.train.batching import collate, plan_batches
from pipeline.train.trainer import Trainer, train_step

# Operator name fragments -> group; the first that matches wins.
# Matrix products are one group: the packed encoder's per-timestep LSTM, the attention and the
# output layer all call aten::mm/addmm/bmm, and the profiler's self time cannot tell them apart.
GROUPS = (
    ("lstm kernels", ("lstm", "rnn", "_thnn_fused", "sigmoid", "tanh_backward", "sigmoid_backward")),
    ("matmul", ("mm", "matmul", "linear")),
    ("softmax+loss", ("softmax", "nll_loss", "cross_entropy")),
    ("embedding", ("embedding",)),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def allreduce_worker(rank: int, numel: int, port: int, reps: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.zeros(numel)
    dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(t)
    if rank == 0:
        out["s"] = (time.perf_counter() - t0) / reps
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--amp-dtype", default="auto", help="train.amp_dtype: auto (bf16 on a CPU with it), bf16, fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    src, tgt = make_rows(4000, args.vocab, rng)
    plans = plan_batches(np.array([len(x) for x in src]), np.array([len(x) for x in tgt]), args.batch_tokens)
    batches = [collate([src[i] for i in p], [tgt[i] for i in p], p, 0, 2, 3) for p in plans[: args.steps]]
    model = build_model(model_cfg=ModelConfig(), src_vocab_size=args.vocab, tgt_vocab_size=args.vocab)
    cfg = TrainConfig(amp_dtype=args.amp_dtype)
    trainer = Trainer(model, cfg, torch.device("cpu"))
    real = sum(b.real_tokens for b in batches)
    amp = trainer.amp_dtype
    for b in batches[:3]:
        trainer.step([b])  # warm-up

    phases = defaultdict(float)
    for b in batches:
        trainer.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss_sum, _ = model(b.src, b.src_lens, b.tgt_in, b.tgt_out, cfg.label_smoothing, b.src_index, b.real_index)
        t1 = time.perf_counter()
        (loss_sum / b.real_tokens).backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        trainer.opt.step()
        trainer.sched.step()
        t3 = time.perf_counter()
        phases["forward"] += t1 - t0
        phases["backward"] += t2 - t1
        phases["optimizer"] += t3 - t2

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[:10]:
            trainer.opt.zero_grad(set_to_none=True)
            train_step(model, b, 1.0, float(b.real_tokens), 1, cfg.label_smoothing, trainer.scaler, amp)
    ops = defaultdict(float)
    averages = prof.key_averages()
    for e in averages:
        ops[group_of(e.key)] += e.self_cpu_time_total
    top = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:8]
    params = sum(p.numel() for p in model.parameters())
    out_ar = mp.Manager().dict()
    port = 29000 + os.getpid() % 1000
    mp.spawn(allreduce_worker, args=(params, port, 20, out_ar), nprocs=2, join=True)
    step_s = sum(phases.values()) / len(batches)
    total_ops = sum(ops.values())
    result = {
        "bench": "profile_step",
        "threads": args.threads,
        "precision": trainer.precision,
        "batch_tokens": args.batch_tokens,
        "params": params,
        "target_tokens_per_step": real / len(batches),
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_s_one_process": round(real / sum(phases.values()), 1),
        "phase_share": {k: round(v / sum(phases.values()), 3) for k, v in phases.items()},
        "forward_backward_op_share": {k: round(v / total_ops, 3) for k, v in sorted(ops.items())},
        "top_ops": [{"op": e.key, "calls": e.count, "share": round(e.self_cpu_time_total / total_ops, 3)} for e in top],
        "allreduce_ms_2_processes": round(out_ar["s"] * 1e3, 1),
        "allreduce_share_of_step": round(out_ar["s"] / (step_s + out_ar["s"]), 3),
    }
    print(json.dumps(result))
    print(
        f"step {result['step_ms']} ms ({result['precision']}) for {result['target_tokens_per_step']:.0f} target tokens"
    )
    for k, v in result["phase_share"].items():
        print(f"  {k:10s} {v:6.1%}")
    for k, v in result["forward_backward_op_share"].items():
        print(f"    {k:12s} {v:6.1%} of forward+backward")
    for t in result["top_ops"]:
        print(f"      {t['op']:36s} {t['calls']:6d} calls {t['share']:6.1%}")
    print(
        f"  allreduce (gloo, 2 processes) {result['allreduce_ms_2_processes']} ms = {result['allreduce_share_of_step']:.1%}"
    )


if __name__ == "__main__":
    main()
