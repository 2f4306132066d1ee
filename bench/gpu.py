"""GPU benchmark, in one go (issue 15 section 3):

(a) our training step (the Trainer: tied embeddings, logits at real tokens only, fused AdamW)
    vs the bare loop of bench/bare_loop.py at the anchor shape (hidden 1024, 2+2 layers,
    vocab 32k, batch 256, every sentence 30 tokens) in fp32, bf16 and fp16: target tokens/s,
    the ratio, and MFU (model FLOPs over the GPU's dense peak at that precision);
(b) ``pipeline train train=gpu model=large`` on Multi30k for a fixed budget, with its test BLEU;
(c) Ray Data feeding the GPU, on (b)'s run: its data-wait fraction and tokens/s, and our
    Trainer alone (no Ray) on the same preprocessed shards for the same model.

Part (a) needs torch alone (no Ray, no MLflow): it runs on a bare GPU image. (b) and (c) are
skipped, saying so, when Ray or MLflow cannot be imported. ``--dry-run`` runs the same code
on the CPU at tiny sizes (fp16, which has no CPU LSTM kernel, is skipped there), in under a
minute. Prints one JSON object and a summary line per part; ``--out FILE`` writes the JSON.

    python bench/gpu.py --multi30k DIR [--minutes 15] [--parts a,b,c] [--out gpu.json]
    python bench/gpu.py --dry-run [--parts a]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from bare_loop import BareSeq2Seq, bare_step, pad  # noqa: E402

from pipeline.config import ModelConfig, TrainConfig  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.models.flops import peak_tflops, step_precision  # noqa: E402
from pipeline.train.batching import collate  # noqa: E402
from pipeline.train.trainer import AMP_DTYPES, Trainer, batch_flops, cpu_has_bf16  # noqa: E402

# Bare-loop figures on one H100 (issue 15), target tokens/s, and the aims for our step.
H100_BARE_ANCHORS = {"fp32": 386_000, "bf16": 514_000, "fp16": 466_000, "input_feeding": 59_000}
AIMS = {"ours_over_bare_bf16": 1.3, "mfu": 0.30, "test_bleu": 36.0, "minutes": 15.0}
ANCHOR = {"hidden": 1024, "emb": 512, "layers": 2, "vocab": 32_000, "batch": 256, "length": 30}
TINY = {"hidden": 32, "emb": 16, "layers": 2, "vocab": 300, "batch": 8, "length": 6}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def anchor_rows(shape: dict, n: int, rng: np.random.Generator) -> list[tuple[list, list]]:
    """``n`` batches of random sentences, every source and target ``length`` tokens long."""
    b, k, v = shape["batch"], shape["length"], shape["vocab"]
    return [([rng.integers(4, v, k) for _ in range(b)], [rng.integers(4, v, k) for _ in range(b)]) for _ in range(n)]


def time_steps(step, batches: list, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step: ``warmup`` steps, then ``steps`` timed to the GPU's last kernel."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - t0) / steps


def best_step_s(
    cfg: ModelConfig, shape: dict, dt: str, device: torch.device, data: dict, warmup: int, steps: int, rounds: int
) -> dict[str, float]:
    """Seconds per step of our Trainer and of the bare loop in precision ``dt``, fresh models
    of the same seed; the best of ``rounds`` alternating rounds of each."""
    amp = AMP_DTYPES[dt]
    torch.manual_seed(0)
    ours = build_model(model_cfg=cfg, src_vocab_size=shape["vocab"], tgt_vocab_size=shape["vocab"]).to(device)
    trainer = Trainer(ours, TrainConfig(lr=1e-3, warmup_steps=100, amp_dtype=dt), device)
    bare = BareSeq2Seq(shape["vocab"], shape["emb"], shape["hidden"], shape["layers"], 0.2).to(device)
    opt = torch.optim.Adam(bare.parameters(), lr=1e-3)  # as bench/bare_loop.py has it
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    run = {
        "ours": lambda b: trainer.step([b]),
        "bare": lambda b: bare_step(bare, opt, *b, label_smoothing=0.1, amp_dtype=amp, scaler=scaler),
    }
    best = {"ours": float("inf"), "bare": float("inf")}
    for _ in range(rounds):
        for k in ("bare", "ours"):
            best[k] = min(best[k], time_steps(run[k], data[k], device, warmup, steps))
    return best


def part_a(device: torch.device, shape: dict, warmup: int, steps: int, rounds: int, dtypes: list[str]) -> dict:
    """Our step vs the bare loop per precision, on the same sentences, alternating in rounds
    so that clock and thermal drift hit both alike; the best round of each counts."""
    rng = np.random.default_rng(0)
    rows = anchor_rows(shape, 4, rng)
    ours_batches = [collate(s, t, list(range(len(s))), 0, 2, 3).to(device) for s, t in rows]
    bare_batches = [
        (
            pad(s).to(device),
            torch.tensor([len(x) for x in s]),
            pad(t, prefix=[2]).to(device),
            pad(t, suffix=[3]).to(device),
        )
        for s, t in rows
    ]
    tokens = ours_batches[0].real_tokens  # per step; targets + EOS, no padding at this shape
    cfg = ModelConfig(
        embedding_size=shape["emb"],
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        dropout=0.2,
        attention="dot",
    )
    # The bare model's FLOPs: ours untied has its matmuls (bi-LSTM, dot attention, combine, h -> V).
    with torch.device("meta"):
        untied = build_model(
            model_cfg=ModelConfig(**{**cfg.__dict__, "tie_embeddings": False}),
            src_vocab_size=shape["vocab"],
            tgt_vocab_size=shape["vocab"],
        )
        tied = build_model(model_cfg=cfg, src_vocab_size=shape["vocab"], tgt_vocab_size=shape["vocab"])
    # Every batch has the same lengths, so one batch's count is every step's.
    first = collate(*rows[0], list(range(shape["batch"])), 0, 2, 3)
    flops = {"ours": batch_flops(tied, first, 0), "bare": batch_flops(untied, first, 0)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out: dict = {"device": name, "shape": shape, "tokens_per_step": tokens, "dtypes": {}}
    for dt in dtypes:
        amp = AMP_DTYPES[dt]
        if amp is torch.float16 and device.type != "cuda":
            out["dtypes"][dt] = {"skipped": "fp16 needs a GPU (PyTorch's CPU LSTM has no fp16 kernel)"}
            continue
        if amp is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
            out["dtypes"][dt] = {"skipped": "bf16 on this CPU: no AVX512-BF16 or AMX (oneDNN has no bf16 LSTM)"}
            continue
        best = best_step_s(cfg, shape, dt, device, {"ours": ours_batches, "bare": bare_batches}, warmup, steps, rounds)
        peak = peak_tflops(name, step_precision(amp)) if device.type == "cuda" else None
        res = {"precision": step_precision(amp) if device.type == "cuda" else dt}
        for k in ("ours", "bare"):
            tflops = flops[k] / best[k] / 1e12
            res[k] = {
                "tokens_per_s": round(tokens / best[k], 1),
                "step_ms": round(best[k] * 1e3, 3),
                "tflops": round(tflops, 3),
                "mfu": round(tflops / peak, 4) if peak else "unknown",
            }
        res["ratio_ours_over_bare"] = round(best["bare"] / best["ours"], 3)
        out["dtypes"][dt] = res
    bf16 = out["dtypes"].get("bf16", {})
    if "ours" in bf16:
        mfu = bf16["ours"]["mfu"]
        out["aims"] = {
            "ours_over_bare_bf16": bf16["ratio_ours_over_bare"],
            "met_ratio": bf16["ratio_ours_over_bare"] >= AIMS["ours_over_bare_bf16"],
            "met_mfu": mfu >= AIMS["mfu"] if isinstance(mfu, float) else "unknown",
        }
    out["h100_bare_anchors_tokens_per_s"] = H100_BARE_ANCHORS
    return out


def ray_and_mlflow() -> str | None:
    """None when both import, else why not (parts b and c are then skipped)."""
    try:
        import mlflow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        return (
            f"Ray or MLflow is not installed ({e}); on the GPU machine carry the wheels of "
            "../shared/tools/device-wheels.sh and run `source .devwhl/device-setup.sh .devwhl` first"
        )
    return None


def parts_bc(args: argparse.Namespace, device: torch.device, parts: str) -> dict:
    """(b) one ``pipeline train`` run for a fixed budget and its test BLEU; (c) how well Ray
    Data fed that run, and our Trainer alone on the same shards and model."""
    why = ray_and_mlflow()
    if why:
        return {p: {"skipped": why} for p in parts}
    from end_to_end import bare_loop
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.train.run import fit_run, prepare

    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp}/mlflow.db"
    if args.dry_run:
        data = ["data=demo_text", f"data.root={tmp}/demo", "data.demo_size=300", "model=small", "model.hidden_size=32"]
        data += ["model.embedding_size=16", "train.use_gpu=false", "train.batch_tokens=200", "train.test_beam_size=1"]
    else:
        if not args.multi30k:
            return {p: {"skipped": "part b needs --multi30k DIR (the Multi30k task 1 files)"} for p in parts}
        data = ["train=gpu", "model=large", "data=multi30k", f"data.root={os.path.abspath(args.multi30k)}"]
    cfg = load_config(
        [
            *data,
            "train.num_workers=1",
            "train.max_epochs=1000",
            f"train.max_minutes={args.minutes}",
            f"train.storage_path={tmp}/ray",
            f"data.output_dir={tmp}/data",
            f"tracking.tracking_uri={uri}",
            "tracking.log_model=false",
            *args.overrides,
        ]
    )
    t0 = time.time()
    prep = prepare(cfg)
    prep_s = time.time() - t0
    res = fit_run(cfg, prep, "bench-gpu")
    metrics = {
        k: [m.value for m in MlflowClient(prep.uri).get_metric_history(res["run_id"], k)]
        for k in ("train_tokens_per_s", "data_wait_fraction", "mfu")
    }
    out: dict = {}
    if "b" in parts:
        out["b"] = {
            "config": " ".join(data),
            "minutes": args.minutes,
            "preprocess_s": round(prep_s, 1),
            "train_s": res["train_seconds"],
            "test_bleu": res.get("test_bleu"),
            "met_bleu": (res.get("test_bleu") or 0) >= AIMS["test_bleu"] and args.minutes <= AIMS["minutes"],
        }
    if "c" in parts:
        # The first window holds the warm-up (and the data pipeline's start): left out, as in
        # bench/end_to_end.py; the median skips the windows that held a validation.
        tps, wait, mfu = (metrics[k][1:] or metrics[k] for k in ("train_tokens_per_s", "data_wait_fraction", "mfu"))
        alone = bare_loop(cfg, prep, args.alone_minutes * 60, device)
        ours = statistics.median(tps) if tps else 0.0
        out["c"] = {
            "windows": len(tps),
            "pipeline_tokens_per_s_median": round(ours, 1),
            "data_wait_fraction_median": round(statistics.median(wait), 4) if wait else None,
            "data_wait_fraction_max": round(max(wait), 4) if wait else None,
            "mfu_median": round(statistics.median(mfu), 4) if mfu else "unknown",
            "trainer_alone": {k: round(v, 1) if isinstance(v, float) else v for k, v in alone.items()},
            "ratio_pipeline_over_trainer_alone": round(ours / alone["tokens_per_s"], 3)
            if alone["tokens_per_s"]
            else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--multi30k", default="", help="folder of the Multi30k task 1 files (part b)")
    ap.add_argument("--minutes", type=float, default=15.0, help="part b's training budget")
    ap.add_argument("--alone-minutes", type=float, default=2.0, help="part c: our Trainer alone, for comparison")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code, in under a minute")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("overrides", nargs="*", help="config overrides for part b (key=value)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = sorted(set(parts) - {"a", "b", "c"}) + sorted(set(args.dtypes.split(",")) - set(AMP_DTYPES))
    if bad:
        ap.error(f"unknown part or dtype: {', '.join(bad)} (parts a,b,c; dtypes fp32,bf16,fp16)")
    if args.dry_run:
        device = torch.device("cpu")
        args.warmup, args.steps, args.rounds = 1, 2, 1
        args.minutes, args.alone_minutes = min(args.minutes, 0.15), min(args.alone_minutes, 0.05)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("no GPU: run with --dry-run on a CPU machine")
    result: dict = {"bench": "gpu", "dry_run": args.dry_run, "torch": torch.__version__}
    if "a" in parts:
        shape = TINY if args.dry_run else ANCHOR
        result["a"] = part_a(device, shape, args.warmup, args.steps, args.rounds, args.dtypes.split(","))
        for dt, r in result["a"]["dtypes"].items():
            if "ours" in r:
                print(
                    f"[a] {dt}: ours {r['ours']['tokens_per_s']:.0f} vs bare {r['bare']['tokens_per_s']:.0f} "
                    f"target tokens/s -> {r['ratio_ours_over_bare']:.2f}x; MFU ours {r['ours']['mfu']}",
                    flush=True,
                )
            else:
                print(f"[a] {dt}: skipped: {r['skipped']}", flush=True)
    bc = [p for p in parts if p in "bc"]
    if bc:
        result.update(parts_bc(args, device, bc))
        for p in bc:
            print(f"[{p}] {json.dumps(result[p])}", flush=True)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
