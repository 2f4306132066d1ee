"""The trainer: plain torch, one process, no Ray.

:class:`Trainer` holds the model, AdamW, the warmup/inverse-sqrt schedule, the AMP scaler
and a typed :class:`TrainState`; ``step(micro_batches)`` takes one optimizer step over
micro-batches, ``evaluate`` scores rows, ``state_dict``/``load_state_dict`` and
``save``/``load`` round-trip all of it. The Ray Train loop (:mod:`pipeline.train.loop`)
wraps it in DDP and feeds it shards; the benchmarks and tests drive it directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..models.flops import train_step_flops
from .batching import Batch


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
) -> torch.Tensor:
    """Forward and backward of one (micro-)batch. Returns this rank's summed loss times
    ``weight``, a float64 scalar left on the device: reading it (``float``) would make the
    host wait for the GPU every micro-batch, so callers add it up there and read it when
    they log.

    DDP averages gradients over ranks, so scaling the summed loss by
    world_size / global_tokens yields the gradient of the mean over all real tokens.
    """
    device_type = batch.src.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss_sum, _ = model(
            batch.src, batch.src_lens, batch.tgt_in, batch.tgt_out, label_smoothing, batch.src_index, batch.real_index
        )
    scaler.scale(loss_sum * (weight * world_size / max(global_tokens, 1.0))).backward()
    return loss_sum.detach().double() * weight


def batch_flops(model: Any, b: Batch, pad_id: int) -> float:
    """Model FLOPs of a training step on this batch, at its real tokens."""
    src = b.src_lens.numpy()
    tgt = (b.tgt_out != pad_id).sum(1).cpu().numpy()
    return train_step_flops(model, src, tgt, src[b.src_index.cpu().numpy()] if b.src_index is not None else None)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX), where oneDNN's
    bf16 matrix products and LSTM run faster than fp32; without it bf16 is emulated, slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``train.amp_dtype`` on ``device``: the autocast dtype, None for fp32. ``auto`` is bf16 on
    a GPU that has it (its range needs no GradScaler), fp16 on an older GPU, bf16 on a CPU with
    bf16 in hardware (the step 1.45-1.65x faster there, bench/README.md), else fp32. ``bf16`` on
    a CPU without it is refused."""
    if name == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_has_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    dtype = AMP_DTYPES[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("train.amp_dtype=fp16 needs a GPU (PyTorch's CPU LSTM has no fp16 kernel): use bf16 or fp32")
    if (
        dtype is torch.bfloat16
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise ValueError(f"train.amp_dtype=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    if dtype is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
        # oneDNN has no bf16 LSTM primitive without them: the first forward would fail deep in _VF.lstm.
        raise ValueError(
            "train.amp_dtype=bf16 on CPU needs AVX512-BF16 or AMX, which this CPU "
            f"({torch.backends.cpu.get_cpu_capability()}) lacks: use fp32 or auto"
        )
    return dtype


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> None:
    """Restore a GradScaler saved on any device, enabled or not. Its state is plain numbers,
    so CPU and GPU checkpoints are the same; what differs is whether it was on: a checkpoint
    of a bf16, fp32 or CPU run holds an empty state (or, before scalers were saved, none),
    which an fp16 run's scaler refuses, so it keeps its fresh state instead."""
    if state:
        scaler.load_state_dict(state)


def micro_sync(model: torch.nn.Module, last: bool) -> Any:
    """Gradient accumulation under DDP: micro-batches before the last one skip the allreduce
    (``no_sync``), so a step of N micro-batches communicates once, not N times."""
    if last or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


@dataclass
class TrainState:
    """Where a run is; saved with every checkpoint as state.json."""

    step: int = 0
    epoch: int = 0
    best: float = -1.0  # the best value so far of the task's validation metric
    evals_since_best: int = 0
    elapsed_s: float = 0.0  # training time of all attempts (the budget is a total)
    validated_step: int = -1
    mlflow_run_id: str | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """A saved state; keys this version does not know (an old ``stop``) are left out, and
        a checkpoint from before ``validated_step`` was validated at its step."""
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in known})
        if "validated_step" not in d:
            state.validated_step = state.step
        return state


class Trainer:
    """One process's training of an encoder-decoder; ``world_size`` > 1 when ``model`` has
    been wrapped for data parallelism (:meth:`wrap`) and ``step`` gets the global token count."""

    def __init__(self, model: torch.nn.Module, train_cfg: Any, device: torch.device, world_size: int = 1):
        t = self.cfg = train_cfg
        self.raw = self.model = model
        self.device, self.world_size = device, world_size
        on_gpu = device.type == "cuda"
        self.amp_dtype = resolve_amp_dtype(t.amp_dtype, device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=on_gpu)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, t.warmup_steps))
        # fp16's narrow range needs loss scaling; bf16 has fp32's exponent and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.state = TrainState()

    def wrap(self, wrapper: Any) -> None:
        """Train through ``wrapper(model)`` (DDP); the raw module keeps the weights."""
        self.model = wrapper(self.raw)

    @property
    def precision(self) -> str:
        """The step's autocast precision by its ``train.amp_dtype`` name (bf16, fp16, fp32)."""
        return next(k for k, v in AMP_DTYPES.items() if v is self.amp_dtype)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def step(
        self, micro: list[Batch | None], global_tokens: float | None = None, blank: Batch | None = None
    ) -> torch.Tensor:
        """One optimizer step over micro-batches (gradient accumulation). ``None`` is a
        zero-weight micro-batch (``blank`` is run with weight 0, so a rank whose data ran out
        still joins the allreduce). The loss is normalised by ``global_tokens`` (default:
        this process's real tokens). Returns this process's summed loss as a float64 scalar
        on the device (see :func:`train_step`); nothing in the step waits for the GPU, except
        an fp16 GradScaler's check for inf gradients."""
        if global_tokens is None:
            global_tokens = float(sum(b.real_tokens for b in micro if b is not None))
        t = self.cfg
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.opt.zero_grad(set_to_none=True)
        for i, b in enumerate(micro):
            batch = b.to(self.device) if b is not None else blank
            with micro_sync(self.model, last=i == len(micro) - 1):
                loss = loss + train_step(
                    self.model,
                    batch,
                    1.0 if b is not None else 0.0,
                    global_tokens,
                    self.world_size,
                    t.label_smoothing,
                    self.scaler,
                    self.amp_dtype,
                )
        self.scaler.unscale_(self.opt)
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), t.clip_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.state.step += 1
        return loss

    def evaluate(
        self, task: Any, rows: dict[str, list], beam_size: int, length_penalty: float, with_loss: bool = True
    ) -> dict[str, Any]:
        """The task's outputs on ``rows`` (columns ``task.eval_columns``): id, src, ref,
        hyp_ids, and the summed loss and target tokens (0 without loss)."""
        model = self.raw
        model.eval()
        out = task.eval_rows(model, rows, beam_size, length_penalty, self.device, with_loss)
        loss_sum, tokens = 0.0, 0
        batches = out.pop("batches")
        if with_loss:
            with torch.no_grad():
                for b in batches:
                    b = b.to(self.device)
                    loss, n = model(b.src, b.src_lens, b.tgt_in, b.tgt_out, 0.0, b.src_index)
                    loss_sum, tokens = loss_sum + float(loss), tokens + int(n)
        model.train()
        return {**out, "loss": loss_sum, "tokens": tokens}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
        }

    def load_state_dict(self, d: dict[str, Any], where: str = "the checkpoint") -> None:
        mine = self.raw.state_dict()
        theirs = d["model"]
        bad = sorted(set(mine) ^ set(theirs)) + sorted(
            k for k in set(mine) & set(theirs) if mine[k].shape != theirs[k].shape
        )
        if bad:
            raise RuntimeError(
                f"{where} does not fit this model config; mismatched keys: {bad[:10]}"
                " (use a new train.run_name, or the config the run was started with)"
            )
        self.raw.load_state_dict(theirs)
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["scheduler"])
        load_scaler_state(self.scaler, d.get("scaler"))
        self.state = TrainState.from_dict(d["state"])

    def save(self, folder: str | None = None, seen: np.ndarray | None = None) -> str:
        """Write a checkpoint folder (see :func:`save_checkpoint`); returns it."""
        seen = seen if seen is not None else np.empty(0, np.int64)
        return save_checkpoint(self.raw, self.opt, self.sched, self.scaler, asdict(self.state), seen, folder)

    def load(self, folder: str, where: str | None = None) -> np.ndarray:
        """Restore a checkpoint folder; returns the example ids already trained on in its epoch."""
        d = {
            "model": torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True),
            **torch.load(os.path.join(folder, "optim.pt"), map_location="cpu", weights_only=True),
        }
        with open(os.path.join(folder, "state.json")) as f:
            d["state"] = json.load(f)
        self.load_state_dict(d, f"checkpoint {where or folder}")
        packed, plain = os.path.join(folder, "seen_ids.npz"), os.path.join(folder, "seen_ids.npy")
        if os.path.exists(packed):
            with np.load(packed, allow_pickle=False) as z:
                return unpack_ids(z)
        # checkpoints written before the ids were packed
        return np.load(plain, allow_pickle=False) if os.path.exists(plain) else np.empty(0, np.int64)


COMPLETE = "files.json"


def save_checkpoint(
    model: Any, opt: Any, sched: Any, scaler: Any, state: dict[str, Any], seen: np.ndarray, d: str | None = None
) -> str:
    """Write a checkpoint into the folder ``d`` (the caller's temporary folder, removed once
    Ray has persisted it; a new temporary folder when None): model.pt, optim.pt, state.json,
    and seen_ids.npz: the example ids already trained on in the current epoch (all ranks), so
    a resume mid-epoch trains on the rest only. ``files.json`` (last) lists every file's size."""
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
