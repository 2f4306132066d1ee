"""The Ray Train worker loop: a Trainer fed by this rank's shards.

Every rank reads its shard of the Parquet splits with ``get_dataset_shard``, batches it by
token budget, and takes data-parallel steps (DDP: gloo on CPU, NCCL on GPU). All ranks
run the same number of steps: a rank whose shard ran out takes a zero-weight step so
that the others finish theirs, and the loss is normalised by the global token count, so
every example of an epoch counts exactly once. A checkpoint also records the ids of the
examples trained on so far in the current epoch; a run resumed from it (a restarted
worker group, or the same ``train.run_name`` again) skips them, so an interrupted epoch
still sees each example exactly once. Validation (the task's loss and scores) runs on
every rank's shard of the val split and is gathered; rank 0 logs to MLflow and writes the
checkpoints. Everything torch is in :class:`~pipeline.train.trainer.Trainer`; this is the
Ray Train adapter around it: shards, allreduce of counts, ``report``, checkpoints staged
in a temporary folder, logging.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import console, tracking
from ..config import Config
from ..data import tokenizer as toklib
from ..data.tokenizer import Vocab
from ..inference import bundle_meta, save_bundle
from ..models.flops import peak_tflops, step_precision
from ..tasks import Task, task_for
from .batching import Batch
from .trainer import COMPLETE, Trainer, batch_flops

LOG_EVERY = 20  # optimizer steps between step-metric logs


def configure_ddp(model: torch.nn.Module, compression: str) -> torch.nn.Module:
    """Register a DDP communication hook that allreduces gradients in fp16 or bf16 (half
    the bytes; the step still updates fp32 weights). A no-op for a single worker."""
    if compression != "none" and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.fp16_compress_hook if compression == "fp16" else default_hooks.bf16_compress_hook
        model.register_comm_hook(None, hook)
    return model


def say(message: str) -> None:
    """A progress line from a worker, printed once. Ray Train V2 patches ``print`` to log the
    line and, when something has wrapped ``sys.stdout`` (as in its workers), to print it
    as well, so a plain ``print`` reached the driver twice."""
    print(message, file=sys.__stdout__, flush=True)


def control_group() -> Any:
    """The process group for the loop's host-side numbers (token counts, "out of data",
    "over budget", the logged sums): gloo, on CPU tensors. Under NCCL a scalar allreduce
    would go through the GPU and its ``tolist`` wait for every kernel queued before it,
    each step; on gloo the host never waits for the device. None: the default group (gloo
    already, or no process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")  # a collective: every rank calls it, once


def _all_reduce(values: list[float], group: Any = None) -> list[float]:
    """Sums over ranks of host numbers, on CPU (see :func:`control_group`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
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


VAL_ROUND_ROWS = 256  # rows per rank between two looks for a drain notice during a validation


def evaluate(
    trainer: Trainer,
    rows: dict[str, list],
    task: Task,
    tgt_tok: Any,
    beam_size: int,
    length_penalty: float,
    between_rounds: Any = None,
) -> dict[str, Any]:
    """Loss, outputs and the task's scores of this rank's rows, gathered from all ranks.

    In rounds of ``VAL_ROUND_ROWS`` rows, every rank the same number (the largest shard's),
    with ``between_rounds()`` (a collective: every rank calls it) after each but the last: the
    loop looks for a drain notice there, so one that comes during a long validation is acted
    on within a round, not after it (when the node may be gone, and the steps since the last
    checkpoint with it)."""
    n = len(rows["id"])
    rounds = max(1, max(math.ceil(m / VAL_ROUND_ROWS) for m in _all_gather(n)))
    local: dict[str, Any] = {"id": [], "src": [], "ref": [], "hyp": [], "loss": 0.0, "tokens": 0}
    for r in range(rounds):
        part = {c: v[r * VAL_ROUND_ROWS : (r + 1) * VAL_ROUND_ROWS] for c, v in rows.items()}
        if part["id"]:
            out = trainer.evaluate(task, part, beam_size, length_penalty)
            local["hyp"] += toklib.decode(tgt_tok, out.pop("hyp_ids"))
            for k in ("id", "src", "ref"):
                local[k] += list(out[k])
            local["loss"] += out["loss"]
            local["tokens"] += out["tokens"]
        if between_rounds is not None and r + 1 < rounds:
            between_rounds()
    parts = _all_gather(local)
    merged: dict[str, Any] = {k: [x for p in parts for x in p[k]] for k in ("id", "src", "ref", "hyp")}
    merged["loss"] = sum(p["loss"] for p in parts) / max(1, sum(p["tokens"] for p in parts))
    merged.update(task.scores(merged["hyp"], merged["ref"]))
    return merged


def val_metrics(res: dict[str, Any], task: Task) -> dict[str, float]:
    out = {"val_loss": res["loss"], "val_ppl": math.exp(min(res["loss"], 50.0))}
    out.update({f"val_{k}": res[k] for k in task.val_scores})
    return out


def _checkpoint_step(ckpt: Any) -> int:
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/state.json") as f:
        return int(json.loads(f.read())["step"])


@dataclass
class LoopConfig:
    """What the driver hands every worker (as a dict: Ray's train_loop_config)."""

    config: dict[str, Any]
    vocab: dict[str, Any]
    mlflow_run_id: str
    tracking_uri: str
    src_tokenizer: str  # the tokenizers' JSON text
    tgt_tokenizer: str
    best_dir: str
    tracking_spill_dir: str
    latest_checkpoint: tuple[int, str] | None = None  # (step, path), listed by the driver
    fingerprint: dict[str, str] = field(default_factory=dict)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's worker function: a :class:`Trainer` fed by this rank's shards."""
    import ray
    import ray.train
    import ray.train.torch

    lc = LoopConfig(**loop_config)
    cfg = Config.from_dict(lc.config)
    vocab, run_id, uri = Vocab.from_dict(lc.vocab), lc.mlflow_run_id, lc.tracking_uri
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, t.cpus_per_worker))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    tgt_tok = toklib.load_tokenizer(lc.tgt_tokenizer)

    task = task_for(cfg)
    metric = task.metric
    trainer = Trainer(task.build_model(cfg.model, vocab).to(device), t, device, world)
    raw = trainer.raw
    ckpt = ray.train.get_checkpoint()
    found = lc.latest_checkpoint
    if found and (ckpt is None or _checkpoint_step(ckpt) < found[0]):
        ckpt = ray.train.Checkpoint(found[1])
    # Example ids of the current epoch trained on before the checkpoint: skipped now, so that
    # each example of an interrupted epoch counts exactly once.
    skip = np.empty(0, np.int64)
    if ckpt:
        with ckpt.as_directory() as d:
            skip = trainer.load(d, ckpt.path)
        if rank == 0:
            say(f"[train] resumed from {ckpt.path} at step {trainer.state.step}, epoch {trainer.state.epoch}")
            if trainer.state.mlflow_run_id != run_id:
                say(
                    f"[train] note: checkpoint belongs to MLflow run {trainer.state.mlflow_run_id}, logging to {run_id}"
                )
    state = trainer.state
    state.mlflow_run_id = run_id
    state.fingerprint = lc.fingerprint
    # Why a run stops is decided anew from this run's config, never kept from an earlier one:
    # the same run_name with a larger max_epochs, max_minutes or early_stopping trains on.
    stop = ""
    seen: list[np.ndarray] = [skip] if rank == 0 else []
    trace = t.trace_examples
    trainer.wrap(
        lambda m: configure_ddp(
            ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"bucket_cap_mb": t.ddp_bucket_mb}),
            t.grad_compression,
        )
    )
    control = control_group()
    node = ray.get_runtime_context().get_node_id()
    nodes = _all_gather(node)
    # One system-metrics sampler per node (its first rank), named by the node's id. Not Ray's
    # local rank: that goes by node IP, which the nodes of a loopback cluster share.
    system = None
    if cfg.tracking.system_metrics_s > 0 and nodes.index(node) == rank:
        system = tracking.start_system_metrics(uri, run_id, f"node-{node[:8]}", cfg.tracking.system_metrics_s)
    # Rank 0's MLflow calls go through a buffer sent by a background thread: an outage of the
    # tracking server neither stalls nor kills training; what is unsent at the end is spilled.
    logger = tracking.RunLogger(uri, run_id, lc.tracking_spill_dir, who="rank0") if rank == 0 else None
    if rank == 0:
        # Steps after the last checkpoint (or all steps, when a group restarts before its
        # first checkpoint) were logged once already; they are recomputed now, and each
        # metric is not logged again at a step it already has (no duplicate steps). The
        # logger asks MLflow for those steps when it answers (maybe after an outage).
        logger.skip_logged_steps()
        logger.set_tags(
            {
                "ray.worker_nodes": ",".join(sorted(set(nodes))),
                "ray.num_worker_nodes": str(len(set(nodes))),
                "pipeline.precision": trainer.precision,  # train.amp_dtype, auto resolved
            }
        )
        if ckpt:
            logger.set_tags({"pipeline.resumed_from_step": str(state.step)})
        logger.flush()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    best_dir = lc.best_dir
    meta = bundle_meta(cfg.model, vocab, cfg.data)

    def log(values: dict[str, float]) -> None:
        if rank == 0:
            logger.log_metrics(values, state.step)
            logger.flush()  # wakes the sender; never waits for MLflow

    def checkpoint_and_report(metrics: dict[str, Any], improved: bool = False) -> None:
        """Save a checkpoint (with every rank's seen ids) and report it: every rank calls this."""
        seen_all = np.unique(np.concatenate(_all_gather(_ids(seen))))  # empty right after an epoch ends
        # The checkpoint is staged in a folder that is removed once Ray has persisted it, and
        # saved before anything is logged: a tracking failure never costs the checkpoint.
        with tempfile.TemporaryDirectory(prefix="ckpt-") as ckpt_dir:
            checkpoint = None
            if rank == 0:
                if improved:
                    save_bundle(best_dir, raw, meta, lc.src_tokenizer, lc.tgt_tokenizer)
                checkpoint = ray.train.Checkpoint.from_directory(trainer.save(ckpt_dir, seen_all))
            ray.train.report(metrics, checkpoint=checkpoint)

    def time_to_look() -> bool:
        """Rank 0's clock: every ``train.preemption_check_s``; the ranks agree through an allreduce."""
        return rank == 0 and time.time() - looked_at >= t.preemption_check_s

    def drain_notice(look: bool) -> Any:
        """Ray Train's drain notice, when ``look`` (every rank passes the same: rank 0's clock
        decides, through an allreduce) and there is one: every rank calls this at the same points."""
        nonlocal looked_at
        if not look:
            return None
        looked_at = time.time()
        return ray.train.get_preemption_info()  # a barrier

    def look_during_validation() -> None:
        (look,) = _all_reduce([float(time_to_look())], control)
        notice = drain_notice(bool(look))
        if notice is not None:
            preempted(notice)  # does not return: Ray Train restarts the group

    def validate_and_report(interruptible: bool = True) -> str:
        """Validate, checkpoint, log; returns "early_stopping" when this validation ends the run.
        A drain notice during it checkpoints at this step unvalidated (the next attempt validates
        it first) and waits for the restart."""
        rows = _shard_rows(val_shard, task.eval_columns)
        between = look_during_validation if interruptible else None
        res = evaluate(trainer, rows, task, tgt_tok, t.eval_beam_size, t.length_penalty, between)
        val = {**val_metrics(res, task), "epoch": state.epoch}
        improved = val[metric] > state.best
        if improved:
            state.best, state.evals_since_best = val[metric], 0
        else:
            state.evals_since_best += 1
        state.elapsed_s = time.time() - t_start if t_start is not None else state.elapsed_s
        state.validated_step = state.step
        last_val.clear()
        last_val.update(val)
        checkpoint_and_report({**val, "step": state.step, f"best_{metric}": state.best}, improved)
        if rank == 0:
            log({**val, f"best_{metric}": state.best})  # after the checkpoint is saved (report persists it)
            say(
                f"[train] step {state.step} epoch {state.epoch}: val_loss {res['loss']:.3f} "
                f"{metric} {val[metric]:.3f}{' (best)' if improved else ''}"
            )
        # Decided right after the validation that triggers it (every rank holds the same counts).
        return "early_stopping" if t.early_stopping and state.evals_since_best >= t.early_stopping else ""

    last_val: dict[str, float] = {}  # a preemption's checkpoint reports the last validation again
    micro_n = micro_batches(t.accumulate, t.num_workers, world, rank)
    if rank == 0 and world != t.num_workers:
        say(f"[train] {world} of {t.num_workers} workers: {micro_n} micro-batches per step on rank 0")
    looked_at = time.time()  # rank 0's clock decides when every rank looks for a drain notice

    def preempted(notice: Any) -> None:
        """A node of this group is being drained: checkpoint now (without validating again, it
        would eat into the deadline), then take no more steps, so none is lost when the node
        goes; Ray Train restarts the group from this checkpoint at the deadline, on the nodes
        left."""
        state.elapsed_s = time.time() - t_start if t_start is not None else state.elapsed_s
        if last_val:
            checkpoint_and_report(
                {**last_val, "step": state.step, f"best_{metric}": state.best, "preemption_checkpoint": 1.0}
            )
        else:  # a sweep's scheduler needs the metric in every report: the first one validates
            validate_and_report(interruptible=False)
        if rank == 0:
            logger.set_tags({"pipeline.preempted_at_step": str(state.step)})
            say(
                f"[train] node(s) {','.join(n[:8] for n in notice.preempted_node_ids)} drained: checkpoint at "
                f"step {state.step}, waiting for the restart"
            )
            logger.close(wait_s=10.0)  # what is unsent is spilled, and replayed by the next attempt
        if system is not None:
            tracking.stop_system_metrics(system)
        wait_for_restart(notice.deadline_ms)

    # The budget's clock runs from this attempt's first batch: starting Ray Data's pipeline
    # (seconds, more on a busy cluster) is not training time, nor is restarting after a failure.
    t_start: float | None = None
    budget_s = t.max_minutes * 60.0
    mega_rows = max(256, t.sort_window * t.batch_tokens // 24)
    specials = vocab.specials
    blank = task.blank_batch(vocab).to(device)  # a zero-weight step's input
    # A log window: the loss adds up on the device (a tensor after the first step) and the
    # steps' batches are kept for their FLOP count, both read once per LOG_EVERY steps, so
    # that no step waits for the GPU or spends host time counting.
    win: dict[str, Any] = {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "wait": 0.0, "steps": [], "start": time.time()}
    # MFU on GPU: model FLOP/s over the device's dense peak at the step's precision
    # (pipeline.models.flops).
    precision = step_precision(trainer.amp_dtype)
    peak = peak_tflops(torch.cuda.get_device_name(device), precision) if on_gpu else None
    if on_gpu and peak is None and rank == 0:
        say(f"[train] no {precision} peak TFLOP/s known for {torch.cuda.get_device_name(device)}: mfu is not logged")
    trainer.model.train()
    if t.early_stopping and state.evals_since_best >= t.early_stopping:
        stop = "early_stopping"  # a rerun with the same patience stays stopped; a larger one goes on
    if not stop and validation_due(state, t.eval_every, len(skip)):
        stop = validate_and_report()  # a drain notice came at a validation point: it was not validated
    epoch_steps, last_epoch_steps = 0, None  # the progress bar's count and its total (the last epoch's)
    while state.epoch < t.max_epochs and not stop:
        rng = np.random.default_rng(t.seed * 100_003 + state.epoch * 101 + rank)
        epoch_fig = {"loss": 0.0, "tokens": 0.0, "start": time.time()}  # the epoch's, for its "done" line
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
            for _ in range(micro_n):
                micro.append(next(batches, None))
            if t_start is None:
                t_start = time.time() - state.elapsed_s
                win["start"] = time.time()
                if rank == 0 and ckpt:  # when training (the budget's clock) went on
                    logger.set_tags({"pipeline.resumed_at": f"{time.time():.3f}"})
            else:
                win["wait"] += time.time() - t_wait
            real = [b for b in micro if b is not None]
            # Right after a validation, the budget is judged by the time its checkpoint recorded:
            # stopping on the clock then would leave a checkpoint short of the budget (the time
            # its report took), and a rerun with the same budget would train that sliver again.
            spent = state.elapsed_s if state.validated_step == state.step else time.time() - t_start
            over = rank == 0 and budget_s > 0 and spent >= budget_s
            look = time_to_look()
            has, over_all, tokens, padded, look_all = _all_reduce(
                [
                    float(bool(real)),
                    float(over),
                    float(sum(b.real_tokens for b in real)),
                    float(sum(b.padded_tokens for b in real)),
                    float(look),
                ],
                control,
            )
            if over_all:
                stop = "max_minutes"
                break
            if not has:
                epoch_done = True
                break
            step_loss = trainer.step(micro, tokens, blank)
            win["loss"] += step_loss
            epoch_fig["loss"] += step_loss
            win["tokens"] += tokens
            epoch_fig["tokens"] += tokens
            win["padded"] += padded
            # What the FLOP count reads (lengths, targets), not the inputs: a window of video
            # clips would stay on the GPU until the window is logged.
            win["steps"].append([replace(b, src=None) for b in real])
            seen += [b.ids.numpy() for b in real]
            epoch_steps += 1
            if trace:  # an audit of exactly-once: every step's example ids, per rank and process
                with open(os.path.join(trace, f"rank{rank}-{os.getpid()}.jsonl"), "a") as f:
                    ids = [int(i) for b in real for i in b.ids]
                    f.write(json.dumps({"epoch": state.epoch, "step": state.step, "t": time.time(), "ids": ids}) + "\n")
            if state.step % LOG_EVERY == 0:
                loss_local = float(win["loss"])  # the one wait for the device: the window's steps are done
                elapsed = time.time() - win["start"]
                flops = 0.0
                for step_batches in win["steps"]:
                    flops += sum(batch_flops(raw, b, vocab.pad_id) for b in step_batches)
                loss_total, flops_total = _all_reduce([loss_local, flops], control)
                tflops = flops_total / max(elapsed, 1e-9) / 1e12
                progress = {
                    "loss": loss_total / max(win["tokens"], 1.0),
                    "tokens_per_s": win["tokens"] / max(elapsed, 1e-9),
                }
                if rank == 0:
                    say(
                        console.progress_line(
                            t.run_name, state.epoch + 1, epoch_steps, last_epoch_steps, **progress, done=False
                        )
                    )
                log(
                    {
                        "train_loss": progress["loss"],
                        "lr": trainer.lr,
                        "train_tokens_per_s": progress["tokens_per_s"],
                        "padding_fraction": 1.0 - win["tokens"] / max(win["padded"], 1.0),
                        "data_wait_fraction": win["wait"] / max(elapsed, 1e-9),
                        "train_tflops": tflops,
                        "num_workers": world,  # the world size over steps, for an elastic run
                        **({"mfu": tflops / (peak * world)} if peak else {}),
                    }
                )
                win = {"loss": 0.0, "tokens": 0.0, "padded": 0.0, "wait": 0.0, "steps": [], "start": time.time()}
            notice = drain_notice(bool(look_all))
            if notice is not None:
                preempted(notice)
            if t.eval_every and state.step % t.eval_every == 0:
                stop = validate_and_report()
                if stop:
                    break
        if epoch_done:
            # The epoch's own figures: an epoch shorter than LOG_EVERY steps has no window of its own.
            (epoch_loss,) = _all_reduce([float(epoch_fig["loss"])], control)
            done_fig = {
                "loss": epoch_loss / max(epoch_fig["tokens"], 1.0),
                "tokens_per_s": epoch_fig["tokens"] / max(time.time() - epoch_fig["start"], 1e-9),
            }
            if rank == 0:
                say(
                    console.progress_line(
                        t.run_name, state.epoch + 1, epoch_steps, last_epoch_steps, **done_fig, done=True
                    )
                )
            last_epoch_steps, epoch_steps = epoch_steps, 0
            state.epoch += 1
            skip, seen = np.empty(0, np.int64), []
        if state.validated_step != state.step:
            # The epoch ended, or the budget ran out mid-epoch: validate and keep what was learned
            # (not again when this run took no step since the last validation).
            stop = validate_and_report() or stop
    if system is not None:
        tracking.stop_system_metrics(system)
    if rank == 0:
        say(
            f"[train] finished: {state.step} steps, {state.epoch} epochs, best {metric} "
            f"{state.best:.3f}, stop reason: {stop or 'max_epochs'}"
        )
        left = logger.close(wait_s=30.0)
        if left:
            say(logger.unsent_message(left))


def validation_due(state: Any, eval_every: int, skipped: int) -> bool:
    """Whether a checkpoint stands at a validation that did not happen: a drain notice came
    during it, or between its step and it. Those are at a multiple of ``eval_every``, or at
    an epoch's end (no example of the epoch seen yet: ``skipped`` is 0); every other
    checkpoint is taken by a validation or is mid-epoch."""
    if state.step == 0 or state.validated_step == state.step:
        return False
    return skipped == 0 or bool(eval_every and state.step % eval_every == 0)


def micro_batches(accumulate: int, num_workers: int, world: int, rank: int) -> int:
    """This rank's micro-batches per step: the global batch is ``accumulate`` micro-batches
    on each of ``num_workers`` ranks, whatever the current world size, so an elastic run
    shrunk to ``world`` ranks spreads the same count over fewer ranks (the first ones take
    one more where it does not divide) and the learning-rate schedule sees the same batch."""
    total = accumulate * num_workers
    return total // world + (1 if rank < total % world else 0)


def wait_for_restart(deadline_ms: int | None, after_s: float = 120.0) -> None:
    """Block until Ray Train tears the group down for the restart (at the drain deadline);
    a group still here ``after_s`` past it fails instead of hanging."""
    end = (deadline_ms / 1000.0 if deadline_ms else time.time()) + after_s
    while time.time() < end:
        time.sleep(0.5)
    raise RuntimeError("the node drain's deadline passed long ago and Ray Train did not restart the workers")


def _ids(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


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
