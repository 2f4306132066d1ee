"""The Ray Train worker loop: one function, with small helpers.

Every rank reads its shard of the Parquet splits with ``get_dataset_shard``, batches it by
token budget, and takes data-parallel steps (DDP: gloo on CPU, NCCL on GPU). All ranks
run the same number of steps: a rank whose shard ran out takes a zero-weight step so
that the others finish theirs, and the loss is normalised by the global token count, so
every example of an epoch counts exactly once. A checkpoint also records the ids of the
examples trained on so far in the current epoch; a run resumed from it (a restarted
worker group, or the same ``train.run_name`` again) skips them, so an interrupted epoch
still sees each example exactly once. Validation (loss, BLEU or CIDEr-D) runs on every
rank's shard of the val split and is gathered; rank 0 logs to MLflow and writes the
checkpoints. The training *step* (:func:`train_step`) is plain torch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import tracking
from ..config import Config
from ..data import tokenizer as toklib
from ..inference import bundle_meta, save_bundle
from ..models import Seq2Seq
from ..models.flops import peak_tflops, train_step_flops
from ..tasks import Task, task_for
from .batching import Batch

LOG_EVERY = 20  # optimizer steps between step-metric logs


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup, then inverse square-root decay: needs no total step count,
    so a wall-clock budget and resumption need no schedule changes."""
    step = max(step, 1)
    if step < warmup_steps:
        return step / warmup_steps
    return math.sqrt(warmup_steps / step) if warmup_steps > 0 else 1.0


def train_step(
    model: torch.nn.Module,
    batch: Batch,
    weight: float,
    global_tokens: float,
    world_size: int,
    label_smoothing: float,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> float:
    """Forward and backward of one (micro-)batch. Returns this rank's summed loss.

    DDP averages gradients over ranks, so scaling the summed loss by
    world_size / global_tokens yields the gradient of the mean over all real tokens.
    """
    device_type = batch.src.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss_sum, _ = model(batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out, label_smoothing, batch.src_index)
    scaler.scale(loss_sum * (weight * world_size / max(global_tokens, 1.0))).backward()
    return float(loss_sum.detach()) * weight


def batch_flops(model: Seq2Seq, b: Batch, pad_id: int) -> float:
    """Model FLOPs of a training step on this batch, at its real tokens."""
    src = b.src_lens.numpy()
    tgt = (b.tgt_out != pad_id).sum(1).cpu().numpy()
    return train_step_flops(model, src, tgt, src[b.src_index.cpu().numpy()] if b.src_index is not None else None)


def configure_ddp(model: torch.nn.Module, compression: str) -> torch.nn.Module:
    """Register a DDP communication hook that allreduces gradients in fp16 or bf16 (half
    the bytes; the step still updates fp32 weights). A no-op for a single worker."""
    if compression != "none" and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.fp16_compress_hook if compression == "fp16" else default_hooks.bf16_compress_hook
        model.register_comm_hook(None, hook)
    return model


def micro_sync(model: torch.nn.Module, last: bool) -> Any:
    """Gradient accumulation under DDP: micro-batches before the last one skip the allreduce
    (``no_sync``), so a step of N micro-batches communicates once, not N times."""
    import contextlib

    if last or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def say(message: str) -> None:
    """A progress line from a worker, printed once. Ray Train V2 patches ``print`` to log the
    line and, when something has wrapped ``sys.stdout`` (as in its workers), to print it
    as well, so a plain ``print`` reached the driver twice."""
    print(message, file=sys.__stdout__, flush=True)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _shard_rows(shard: Any, columns: tuple[str, ...]) -> dict[str, list]:
    rows: dict[str, list] = {c: [] for c in columns}
    for b in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for c in columns:
            rows[c].extend(b[c].tolist())
    return rows


def _loss(model: Seq2Seq, batches: Any, device: torch.device) -> tuple[float, int]:
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            loss, n = model(b.src, b.src_lens, b.tgt_in, b.tgt_out, 0.0, b.src_index)
            loss_sum, tokens = loss_sum + float(loss), tokens + int(n)
    return loss_sum, tokens


def evaluate(
    model: Seq2Seq,
    shard: Any,
    task: Task,
    tgt_tok: Any,
    device: torch.device,
    beam_size: int,
    length_penalty: float,
    with_loss: bool = True,
) -> dict[str, Any]:
    """Loss, outputs and the task's scores of this rank's shard, gathered from all ranks."""
    model.eval()
    local = task.eval_rows(model, _shard_rows(shard, task.eval_columns), beam_size, length_penalty, device, with_loss)
    loss = _loss(model, local.pop("batches"), device) if with_loss else (0.0, 0)
    local.update(hyp=toklib.decode(tgt_tok, local.pop("hyp_ids")), loss=loss[0], tokens=loss[1])
    parts = _all_gather(local)
    merged: dict[str, Any] = {k: [x for p in parts for x in p[k]] for k in ("id", "src", "ref", "hyp")}
    merged["loss"] = sum(p["loss"] for p in parts) / max(1, sum(p["tokens"] for p in parts))
    merged.update(task.scores(merged["hyp"], merged["ref"]))
    model.train()
    return merged


def val_metrics(res: dict[str, Any], task: Task) -> dict[str, float]:
    out = {"val_loss": res["loss"], "val_ppl": math.exp(min(res["loss"], 50.0))}
    out.update({f"val_{k}": res[k] for k in task.val_scores})
    return out


def _ids(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def pack_ids(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Example ids as one bitmap per input file: an id is ``file_index << 32 | line``, so
    each file's ids form a dense range of lines. A set of ids then costs about one bit per
    line of the files it touches (125 kB per million rows) instead of 8 bytes per id."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    files, first = np.unique(ids >> 32, return_index=True)
    lows = ids & 0xFFFFFFFF
    starts, lengths, bits = [], [], []
    for i, _f in enumerate(files):
        part = lows[first[i] : first[i + 1] if i + 1 < len(files) else len(ids)]
        start, n = int(part[0]), int(part[-1] - part[0] + 1)
        mask = np.zeros(n, dtype=bool)
        mask[part - start] = True
        starts.append(start)
        lengths.append(n)
        bits.append(np.packbits(mask))
    return {
        "files": files.astype(np.int64),
        "starts": np.asarray(starts, np.int64),
        "lengths": np.asarray(lengths, np.int64),
        "bits": np.concatenate(bits) if bits else np.empty(0, np.uint8),
    }


def unpack_ids(packed: Any) -> np.ndarray:
    out, offset = [], 0
    for f, start, n in zip(packed["files"], packed["starts"], packed["lengths"]):
        nbytes = (int(n) + 7) // 8
        mask = np.unpackbits(packed["bits"][offset : offset + nbytes])[: int(n)].astype(bool)
        out.append((int(f) << 32) | (int(start) + np.flatnonzero(mask)))
        offset += nbytes
    return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)


def _save_checkpoint(
    model: Seq2Seq, opt: Any, sched: Any, scaler: Any, state: dict[str, Any], seen: np.ndarray, d: str | None = None
) -> str:
    """Write a checkpoint into the folder ``d`` (the caller's temporary folder, removed once
    Ray has persisted it; a new temporary folder when None): model.pt, optim.pt, state.json, and seen_ids.npz: the example ids
    already trained on in the current epoch (all ranks), so a resume mid-epoch trains on the
    rest only."""
    d = d or tempfile.mkdtemp(prefix="ckpt-")
    np.savez(os.path.join(d, "seen_ids.npz"), **pack_ids(seen))
    torch.save(model.state_dict(), os.path.join(d, "model.pt"))
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict()},
        os.path.join(d, "optim.pt"),
    )
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump(state, f)
    sizes = {n: os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)}
    with open(os.path.join(d, COMPLETE), "w") as f:  # a reader checks every file is all there
        json.dump(sizes, f)
    return d


COMPLETE = "files.json"


def latest_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """The newest complete checkpoint under a Ray Train run folder (local path or URI), found
    by listing, as (step, path). Ray's own record of checkpoints is written by its controller
    a moment after a worker has uploaded one; a driver killed in that moment leaves a
    checkpoint that only a listing finds. Incomplete uploads (sizes not matching
    ``files.json``) are passed over."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(run_dir)
    best: tuple[int, str] | None = None
    try:
        dirs = [d for d in fs.ls(root, detail=False) if os.path.basename(d.rstrip("/")).startswith("checkpoint_")]
    except FileNotFoundError:
        return None
    for d in dirs:
        try:
            listing = {os.path.basename(e["name"].rstrip("/")): e["size"] for e in fs.ls(d, detail=True)}
            sizes = json.loads(fs.cat_file(f"{d}/{COMPLETE}"))
            if any(listing.get(n) != size for n, size in sizes.items()):
                continue
            step = int(json.loads(fs.cat_file(f"{d}/state.json"))["step"])
        except (OSError, ValueError, KeyError):
            continue
        if best is None or step > best[0]:
            best = (step, fs.unstrip_protocol(d) if "://" in run_dir else d)
    return best


def _checkpoint_step(ckpt: Any) -> int:
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/state.json") as f:
        return int(json.loads(f.read())["step"])


def _load_checkpoint(ckpt: Any, model: Seq2Seq, opt: Any, sched: Any, scaler: Any) -> dict[str, Any]:
    with ckpt.as_directory() as d:
        model_state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
        mine = model.state_dict()
        bad = sorted(set(mine) ^ set(model_state)) + sorted(
            k for k in set(mine) & set(model_state) if mine[k].shape != model_state[k].shape
        )
        if bad:
            raise RuntimeError(
                f"checkpoint {ckpt.path} does not fit this model config; mismatched keys: {bad[:10]}"
                " (use a new train.run_name, or the config the run was started with)"
            )
        model.load_state_dict(model_state)
        rest = torch.load(os.path.join(d, "optim.pt"), map_location="cpu", weights_only=True)
        opt.load_state_dict(rest["optimizer"])
        sched.load_state_dict(rest["scheduler"])
        scaler.load_state_dict(rest["scaler"])
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        packed, plain = os.path.join(d, "seen_ids.npz"), os.path.join(d, "seen_ids.npy")
        if os.path.exists(packed):
            with np.load(packed, allow_pickle=False) as z:
                state["seen_ids"] = unpack_ids(z)
        else:  # checkpoints written before the ids were packed
            state["seen_ids"] = np.load(plain, allow_pickle=False) if os.path.exists(plain) else np.empty(0, np.int64)
        return state


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"])
    vocab, run_id, uri = loop_config["vocab"], loop_config["mlflow_run_id"], loop_config["tracking_uri"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, t.cpus_per_worker))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    amp_dtype = torch.float16 if (on_gpu and t.amp) else None
    tgt_tok = toklib.load_tokenizer(loop_config["tgt_tokenizer"])

    task = task_for(cfg)
    metric = task.metric
    raw = task.build_model(cfg.model, vocab).to(device)
    opt = torch.optim.AdamW(raw.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=on_gpu)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is not None)
    state = {
        "step": 0,
        "epoch": 0,
        "best": -1.0,
        "evals_since_best": 0,
        "elapsed_s": 0.0,
        "mlflow_run_id": run_id,
        "validated_step": -1,
    }
    ckpt = ray.train.get_checkpoint()
    found = loop_config.get("latest_checkpoint")  # (step, path) listed by the driver
    if found and (ckpt is None or _checkpoint_step(ckpt) < found[0]):
        ckpt = ray.train.Checkpoint(found[1])
    if ckpt:
        state = _load_checkpoint(ckpt, raw, opt, sched, scaler)
        if rank == 0:
            say(f"[train] resumed from {ckpt.path} at step {state['step']}, epoch {state['epoch']}")
            if state.get("mlflow_run_id") != run_id:
                say(f"[train] note: checkpoint belongs to MLflow run {state.get('mlflow_run_id')}, logging to {run_id}")
        state["mlflow_run_id"] = run_id
        state.setdefault("validated_step", state["step"])  # every checkpoint is written at a validation
    # Why a run stops is decided anew from this run's config, never kept from an earlier one:
    # the same run_name with a larger max_epochs, max_minutes or early_stopping trains on.
    state.pop("stop", None)
    state["fingerprint"] = loop_config.get("fingerprint", {})
    stop = ""
    # Example ids of the current epoch trained on before the checkpoint: skipped now, so that
    # each example of an interrupted epoch counts exactly once.
    skip = state.pop("seen_ids", np.empty(0, np.int64))
    seen: list[np.ndarray] = [skip] if rank == 0 else []
    trace = t.trace_examples
    model = configure_ddp(
        ray.train.torch.prepare_model(raw, parallel_strategy_kwargs={"bucket_cap_mb": t.ddp_bucket_mb}),
        t.grad_compression,
    )
    nodes = _all_gather(ray.get_runtime_context().get_node_id())
    # Rank 0's MLflow calls go through a buffer sent by a background thread: an outage of the
    # tracking server neither stalls nor kills training; what is unsent at the end is spilled.
    logger = tracking.RunLogger(uri, run_id, loop_config["tracking_spill_dir"], who="rank0") if rank == 0 else None
    if rank == 0:
        # Steps after the last checkpoint (or all steps, when a group restarts before its
        # first checkpoint) were logged once already; they are recomputed now, and each
        # metric is not logged again at a step it already has (no duplicate steps). The
        # logger asks MLflow for those steps when it answers (maybe after an outage).
        logger.skip_logged_steps()
        logger.set_tags(
            {"ray.worker_nodes": ",".join(sorted(set(nodes))), "ray.num_worker_nodes": str(len(set(nodes)))}
        )
        if ckpt:
            logger.set_tags(
                {"pipeline.resumed_at": f"{time.time():.3f}", "pipeline.resumed_from_step": str(state["step"])}
            )
        logger.flush()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    best_dir = loop_config["best_dir"]
    meta = bundle_meta(cfg.model, vocab, cfg.data)

    def log(values: dict[str, float]) -> None:
        if rank == 0:
            logger.log_metrics(values, state["step"])
            logger.flush()  # wakes the sender; never waits for MLflow

    def validate_and_report() -> str:
        """Validate, checkpoint, log; returns "early_stopping" when this validation ends the run."""
        res = evaluate(raw, val_shard, task, tgt_tok, device, t.eval_beam_size, t.length_penalty)
        val = {**val_metrics(res, task), "epoch": state["epoch"]}
        improved = val[metric] > state["best"]
        if improved:
            state["best"], state["evals_since_best"] = val[metric], 0
        else:
            state["evals_since_best"] += 1
        state["elapsed_s"] = time.time() - t_start if t_start is not None else state["elapsed_s"]
        state["validated_step"] = state["step"]
        seen_all = np.unique(np.concatenate(_all_gather(_ids(seen))))  # empty right after an epoch ends
        # The checkpoint is staged in a folder that is removed once Ray has persisted it, and
        # saved before anything is logged: a tracking failure never costs the checkpoint.
        with tempfile.TemporaryDirectory(prefix="ckpt-") as ckpt_dir:
            checkpoint = None
            if rank == 0:
                if improved:
                    save_bundle(best_dir, raw, meta, loop_config["src_tokenizer"], loop_config["tgt_tokenizer"])
                checkpoint = ray.train.Checkpoint.from_directory(
                    _save_checkpoint(raw, opt, sched, scaler, state, seen_all, ckpt_dir)
                )
            ray.train.report({**val, "step": state["step"], f"best_{metric}": state["best"]}, checkpoint=checkpoint)
        if rank == 0:
            log({**val, f"best_{metric}": state["best"]})  # after the checkpoint is saved (report persists it)
            say(
                f"[train] step {state['step']} epoch {state['epoch']}: val_loss {res['loss']:.3f} "
                f"{metric} {val[metric]:.3f}{' (best)' if improved else ''}"
            )
        # Decided right after the validation that triggers it (every rank holds the same counts).
        return "early_stopping" if t.early_stopping and state["evals_since_best"] >= t.early_stopping else ""

    # The budget's clock runs from this attempt's first batch: starting Ray Data's pipeline
    # (seconds, more on a busy cluster) is not training time, nor is restarting after a failure.
    t_start: float | None = None
    budget_s = t.max_minutes * 60.0
    mega_rows = max(256, t.sort_window * t.batch_tokens // 24)
    specials = (vocab["pad_id"], vocab["bos_id"], vocab["eos_id"])
    dummy = task.blank_batch(vocab).to(device)  # a zero-weight step's input
    win = {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "wait": 0.0, "flops": 0.0, "start": time.time()}
    # MFU on GPU: model FLOP/s over the device's dense fp16/bf16 peak (pipeline.models.flops).
    peak = peak_tflops(torch.cuda.get_device_name(device)) if on_gpu else None
    if on_gpu and peak is None and rank == 0:
        say(f"[train] no peak TFLOP/s known for {torch.cuda.get_device_name(device)}: mfu is not logged")
    model.train()
    if t.early_stopping and state["evals_since_best"] >= t.early_stopping:
        stop = "early_stopping"  # a rerun with the same patience stays stopped; a larger one goes on
    while state["epoch"] < t.max_epochs and not stop:
        rng = np.random.default_rng(t.seed * 100_003 + state["epoch"] * 101 + rank)
        batches = task.batches(
            train_shard.iter_batches(
                batch_size=task.rows_per_read(mega_rows), batch_format="numpy", prefetch_batches=2
            ),
            t.batch_tokens,
            specials,
            rng,
            on_gpu,
            skip,
        )
        epoch_done = False
        while not epoch_done:
            micro: list[Batch | None] = []
            t_wait = time.time()
            for _ in range(t.accumulate):
                micro.append(next(batches, None))
            if t_start is None:
                t_start = time.time() - state["elapsed_s"]
                win["start"] = time.time()
            else:
                win["wait"] += time.time() - t_wait
            real = [b for b in micro if b is not None]
            over = rank == 0 and budget_s > 0 and time.time() - t_start >= budget_s
            has, over_all, tokens, padded = _all_reduce(
                [
                    float(bool(real)),
                    float(over),
                    float(sum(b.real_tokens for b in real)),
                    float(sum(b.padded_tokens for b in real)),
                ],
                device,
            )
            if over_all:
                stop = "max_minutes"
                break
            if not has:
                epoch_done = True
                break
            opt.zero_grad(set_to_none=True)
            for i, b in enumerate(micro):
                weight = 1.0 if b is not None else 0.0
                batch = b.to(device) if b is not None else dummy
                with micro_sync(model, last=i == len(micro) - 1):
                    win["loss"] += train_step(model, batch, weight, tokens, world, t.label_smoothing, scaler, amp_dtype)
            scaler.unscale_(opt)
            if t.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), t.clip_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            state["step"] += 1
            win["tokens"] += tokens
            win["padded"] += padded
            win["flops"] += sum(batch_flops(raw, b, vocab["pad_id"]) for b in real)
            seen += [b.ids.numpy() for b in real]
            if trace:  # an audit of exactly-once: every step's example ids, per rank and process
                with open(os.path.join(trace, f"rank{rank}-{os.getpid()}.jsonl"), "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "epoch": state["epoch"],
                                "step": state["step"],
                                "ids": [int(i) for b in real for i in b.ids],
                            }
                        )
                        + "\n"
                    )
            if state["step"] % LOG_EVERY == 0:
                loss_total, flops_total = _all_reduce([win["loss"], win["flops"]], device)
                elapsed = time.time() - win["start"]
                tflops = flops_total / max(elapsed, 1e-9) / 1e12
                log(
                    {
                        "train_loss": loss_total / max(win["tokens"], 1.0),
                        "lr": sched.get_last_lr()[0],
                        "train_tokens_per_s": win["tokens"] / max(elapsed, 1e-9),
                        "padding_fraction": 1.0 - win["tokens"] / max(win["padded"], 1.0),
                        "data_wait_fraction": win["wait"] / max(elapsed, 1e-9),
                        "train_tflops": tflops,
                        **({"mfu": tflops / (peak * world)} if peak else {}),
                    }
                )
                win = {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "wait": 0.0, "flops": 0.0, "start": time.time()}
            if t.eval_every and state["step"] % t.eval_every == 0:
                stop = validate_and_report()
                if stop:
                    break
        if epoch_done:
            state["epoch"] += 1
            skip, seen = np.empty(0, np.int64), []
        if state["validated_step"] != state["step"]:
            # The epoch ended, or the budget ran out mid-epoch: validate and keep what was learned
            # (not again when this run took no step since the last validation).
            stop = validate_and_report() or stop
    if rank == 0:
        say(
            f"[train] finished: {state['step']} steps, {state['epoch']} epochs, best {metric} "
            f"{state['best']:.3f}, stop reason: {stop or 'max_epochs'}"
        )
        left = logger.close(wait_s=30.0)
        if left:
            say(logger.unsent_message(left))
