"""A hand-written single-process PyTorch baseline: bi-LSTM encoder + dot-attention LSTM
decoder, the kind of loop a team writes before adopting a pipeline.

It reads the same preprocessed Parquet shards as `pipeline train` (same tokenizer), trains
for a wall-clock budget with random sentence batches (no length bucketing), then decodes
the test split greedily and prints JSON: test BLEU, target tokens/s.

    python bench/bare_loop.py DATA_DIR --minutes 12 --hidden 256
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS = 0, 2, 3


class BareSeq2Seq(nn.Module):
    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.src_emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.enc = nn.LSTM(emb, hidden // 2, layers, batch_first=True, bidirectional=True, dropout=dropout)
        self.dec = nn.LSTM(emb, hidden, layers, batch_first=True, dropout=dropout)
        self.combine = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.drop = nn.Dropout(dropout)

    def encode(self, src, lens):
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.src_emb(src)), lens, batch_first=True, enforce_sorted=False
        )
        out, (h, c) = self.enc(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        L = h.size(0) // 2
        h = h.view(L, 2, h.size(1), -1).transpose(1, 2).reshape(L, h.size(1), -1)
        c = c.view(L, 2, c.size(1), -1).transpose(1, 2).reshape(L, c.size(1), -1)
        return out, (h, c), src != PAD

    def decode(self, tgt_in, enc, state, mask):
        out, state = self.dec(self.drop(self.tgt_emb(tgt_in)), state)
        scores = torch.bmm(out, enc.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), -1e9)
        ctx = torch.bmm(scores.softmax(-1), enc)
        return self.out(self.drop(torch.tanh(self.combine(torch.cat([ctx, out], -1))))), state


def bare_step(
    model: BareSeq2Seq,
    opt: torch.optim.Optimizer,
    src: torch.Tensor,
    lens: torch.Tensor,
    tgt_in: torch.Tensor,
    tgt_out: torch.Tensor,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step of the bare loop: full logits, the mean loss, clipping at 1.0; under
    autocast when ``amp_dtype`` is set (``scaler``: an enabled GradScaler for fp16). Returns
    the loss, unread. ``lens`` stays on the CPU (``pack_padded_sequence`` wants it there)."""
    with torch.autocast(src.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        enc, state, mask = model.encode(src, lens)
        logits, _ = model.decode(tgt_in, enc, state, mask)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=PAD, label_smoothing=label_smoothing
        )
    opt.zero_grad()
    if scaler is None:
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return loss.detach()


def pad(seqs, prefix=(), suffix=()):
    rows = [list(prefix) + list(s) + list(suffix) for s in seqs]
    n = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (n - len(r)) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--emb", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    # Only the training script reads data: the model and its step import with torch alone.
    import pyarrow.parquet as pq
    import sacrebleu
    from tokenizers import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    train = pq.read_table(f"{args.data_dir}/train").to_pydict()
    test = pq.read_table(f"{args.data_dir}/test").to_pydict()
    tok = Tokenizer.from_file(f"{args.data_dir}/tgt_tokenizer.json")
    model = BareSeq2Seq(tok.get_vocab_size(), args.emb, args.hidden, args.layers, 0.2)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    idx = list(range(len(train["src_ids"])))
    t0, steps, tokens, epoch = time.time(), 0, 0, 0
    while time.time() - t0 < args.minutes * 60:
        random.shuffle(idx)
        for i in range(0, len(idx), args.batch):
            b = idx[i : i + args.batch]
            src = pad([train["src_ids"][j] for j in b])
            lens = torch.tensor([max(1, len(train["src_ids"][j])) for j in b])
            tgt_in = pad([train["tgt_ids"][j] for j in b], prefix=[BOS])
            tgt_out = pad([train["tgt_ids"][j] for j in b], suffix=[EOS])
            loss = bare_step(model, opt, src, lens, tgt_in, tgt_out)
            steps += 1
            tokens += int((tgt_out != PAD).sum())
            if time.time() - t0 >= args.minutes * 60:
                break
        epoch += 1
    train_s = time.time() - t0
    model.eval()
    hyps = []
    with torch.no_grad():
        for i in range(0, len(test["src_ids"]), 100):
            srcs = test["src_ids"][i : i + 100]
            src = pad(srcs)
            enc, state, mask = model.encode(src, torch.tensor([max(1, len(s)) for s in srcs]))
            tok_in = torch.full((len(srcs), 1), BOS)
            outs, done = [], torch.zeros(len(srcs), dtype=torch.bool)
            for _ in range(src.size(1) * 2 + 10):
                logits, state = model.decode(tok_in, enc, state, mask)
                tok_in = logits[:, -1].argmax(-1, keepdim=True)
                outs.append(tok_in.squeeze(1))
                done |= tok_in.squeeze(1) == EOS
                if done.all():
                    break
            for row in torch.stack(outs, 1).tolist():
                hyps.append(row[: row.index(EOS)] if EOS in row else row)
    text = tok.decode_batch(hyps, skip_special_tokens=True)
    bleu = sacrebleu.corpus_bleu(text, [test["tgt"]]).score
    print(
        json.dumps(
            {
                "bench": "bare_loop",
                "minutes": args.minutes,
                "hidden": args.hidden,
                "steps": steps,
                "epochs": epoch,
                "target_tokens_per_s": round(tokens / train_s, 1),
                "test_bleu_greedy": round(bleu, 2),
                "threads": torch.get_num_threads(),
                "final_train_ppl": round(math.exp(min(float(loss), 50)), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
