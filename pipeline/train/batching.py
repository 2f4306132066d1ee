"""Token-budget batching from length-sorted mega-batches, and collation to tensors.

Ray Data has no length bucketing, so each worker pulls a mega-batch of rows from its
shard, sorts it by length, cuts batches whose padded target size stays within the
token budget, and yields them in shuffled order. Every row of a mega-batch lands in
exactly one batch, so one pass over a shard sees each example exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) padded source ids
    src_lens: torch.Tensor  # (B,)
    tgt_in: torch.Tensor  # (B, T) BOS + target
    tgt_out: torch.Tensor  # (B, T) target + EOS
    ids: torch.Tensor  # (B,) example ids
    real_tokens: int  # non-pad target tokens
    padded_tokens: int  # B * T
    src_index: torch.Tensor | None = None  # (B,) row of src per target when targets share a source
    # (N,) flat positions in (B, T) of the real target tokens, found on the host: selecting
    # them with a boolean mask on the GPU would make the host wait for it every micro-batch.
    real_index: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        index = self.src_index.to(device, non_blocking=non_blocking) if self.src_index is not None else None
        real = self.real_index.to(device, non_blocking=non_blocking) if self.real_index is not None else None
        return Batch(
            self.src.to(device, non_blocking=non_blocking),
            self.src_lens,
            self.tgt_in.to(device, non_blocking=non_blocking),
            self.tgt_out.to(device, non_blocking=non_blocking),
            self.ids,
            self.real_tokens,
            self.padded_tokens,
            index,
            real,
        )


def plan_batches(
    src_lens: np.ndarray, tgt_lens: np.ndarray, batch_tokens: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Index groups whose padded size max(len) * rows (target side incl. EOS, and source)
    stays within ``batch_tokens``; a single over-long row still gets its own batch."""
    order = np.lexsort((src_lens, tgt_lens))
    batches, start, longest = [], 0, 0
    for pos, i in enumerate(order):
        width = max(int(tgt_lens[i]) + 1, int(src_lens[i]))
        if pos > start and max(longest, width) * (pos - start + 1) > batch_tokens:
            batches.append(order[start:pos])
            start, longest = pos, 0
        longest = max(longest, width)
    if start < len(order):
        batches.append(order[start:])
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(
    src_ids: Sequence[np.ndarray],
    tgt_ids: Sequence[np.ndarray],
    ids: Sequence[int],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    pin: bool = False,
) -> Batch:
    b = len(src_ids)
    s_len = max(1, max(len(s) for s in src_ids))
    t_len = max(len(t) for t in tgt_ids) + 1
    src = np.full((b, s_len), pad_id, dtype=np.int64)
    tgt_in = np.full((b, t_len), pad_id, dtype=np.int64)
    tgt_out = np.full((b, t_len), pad_id, dtype=np.int64)
    lens = np.empty(b, dtype=np.int64)
    for r, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[r, : len(s)] = s
        lens[r] = max(1, len(s))
        tgt_in[r, 0] = bos_id
        tgt_in[r, 1 : len(t) + 1] = t
        tgt_out[r, : len(t)] = t
        tgt_out[r, len(t)] = eos_id
    real = int(sum(len(t) + 1 for t in tgt_ids))
    tensors = [torch.from_numpy(x) for x in (src, lens, tgt_in, tgt_out, np.flatnonzero(tgt_out != pad_id))]
    if pin:
        tensors = [t.pin_memory() for t in tensors]
    return Batch(
        tensors[0],
        tensors[1],
        tensors[2],
        tensors[3],
        torch.as_tensor(np.asarray(ids, dtype=np.int64)),
        real,
        b * t_len,
        real_index=tensors[4],
    )


def token_batches(
    mega_batches: Iterator[dict[str, np.ndarray]],
    batch_tokens: int,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    rng: np.random.Generator | None = None,
    pin: bool = False,
    skip: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Mega-batches of rows (columns src_ids, tgt_ids, src_len, tgt_len, id) -> Batches.
    Rows whose id is in ``skip`` (trained on before a resume) are left out."""
    for mb in mega_batches:
        if skip is not None and len(skip):
            keep = ~np.isin(mb["id"], skip)
            mb = {k: v[keep] for k, v in mb.items()}
            if not keep.any():
                continue
        for idx in plan_batches(np.asarray(mb["src_len"]), np.asarray(mb["tgt_len"]), batch_tokens, rng):
            yield collate(
                [mb["src_ids"][i] for i in idx],
                [mb["tgt_ids"][i] for i in idx],
                mb["id"][idx],
                pad_id,
                bos_id,
                eos_id,
                pin,
            )
