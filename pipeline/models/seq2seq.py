"""LSTM encoder-decoder with attention, plus greedy and beam-search decoding. Torch only.

Shapes: B batch, S source length, T target length, E embedding size, H hidden size,
V vocabulary size. Token id conventions: ``pad_id`` pads, ``bos_id`` starts a target.

The encoder is a bidirectional multi-layer LSTM (H/2 per direction, so its outputs and
its concatenated final states have size H and can initialise the decoder directly). It
reads packed sequences, so padding never changes a real position's output.

The decoder runs ``nn.LSTM`` over the whole target sequence in one call during training
and applies attention to all steps at once (Luong-style); that is several times faster
than stepping token by token. Input feeding (the previous attentional vector concatenated
to the next input) forces a step loop and is optional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

LSTMState = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Scores decoder states (B, T, H) against encoder outputs (B, S, H)."""

    def __init__(self, hidden_size: int, attention: str):
        super().__init__()
        self.attention = attention
        if attention == "general":
            self.key = nn.Linear(hidden_size, hidden_size, bias=False)
        elif attention == "mlp":
            self.key = nn.Linear(hidden_size, hidden_size, bias=False)
            self.query = nn.Linear(hidden_size, hidden_size, bias=True)
            self.v = nn.Linear(hidden_size, 1, bias=False)
        elif attention != "dot":
            raise ValueError(f"unknown attention '{attention}' (dot, general, mlp)")

    def keys(self, enc_out: torch.Tensor) -> torch.Tensor:
        """Precompute the source side once per sentence: (B, S, H)."""
        return enc_out if self.attention == "dot" else self.key(enc_out)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, enc_out: torch.Tensor, src_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, H), keys/enc_out (B, S, H), src_mask (B, S) True at real tokens ->
        context (B, T, H) and the attention weights (B, T, S)."""
        if self.attention == "mlp":
            scores = self.v(torch.tanh(self.query(query).unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~src_mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights, enc_out), weights


class FrameInput(nn.Module):
    """The video encoder's input module: per-frame vectors -> (B, K, E).

    ``frames`` (B, K, H, W, 3) uint8 go through a small CNN trained end to end. Its last map
    is read two ways: max-pooled over space, what is in the frame wherever it is (shape,
    colour: the same detector everywhere), and average-pooled to a coarse grid, where it is
    (motion is a change of place). ``features`` (B, K, D), precomputed or from a frozen
    backbone, skip the CNN. Each step sees its frame vector and the change from the previous
    frame: motion is a difference between frames, and handing it over directly spares the
    LSTM from learning to subtract.
    """

    GRID = 4  # cells per side of the "where" read-out

    def __init__(
        self, kind: str, embedding_size: int, dropout: float, feature_dim: int = 0, channels: int = 32, shift: int = 0
    ):
        super().__init__()
        self.kind = kind
        self.shift = shift
        if kind == "frames":
            c = channels

            def conv(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
                # Batch norm: a CNN trained from scratch next to an LSTM learns in far fewer steps.
                return [
                    nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]

            self.cnn = nn.Sequential(
                *conv(3, c // 2, 5, 2),
                *conv(c // 2, c, 3),
                nn.MaxPool2d(2),
                *conv(c, c, 3),
                nn.MaxPool2d(2),
                *conv(c, c, 3),
            )
            self.where = nn.Sequential(nn.AdaptiveAvgPool2d(self.GRID), nn.Flatten())
            self.what = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
            feature_dim = c * (self.GRID * self.GRID + 1)
            self.register_buffer("mean", torch.tensor([0.45, 0.45, 0.45]).view(1, 3, 1, 1), persistent=False)
        elif kind != "features":
            raise ValueError(f"unknown video input '{kind}' (frames, features)")
        self.norm = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(2 * feature_dim, embedding_size)
        self.dropout = nn.Dropout(dropout)
        self.embedding_dim = embedding_size

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        b, k = src.shape[:2]
        if self.kind == "frames":
            x = src.reshape(b * k, *src.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0) - self.mean
            if self.training and self.shift:
                x = self._shifted(x, b)
            fmap = self.cnn(x)
            f = torch.cat([self.what(fmap), self.where(fmap)], dim=-1).view(b, k, -1)
        else:
            f = src.float()
        f = self.norm(f)
        delta = torch.cat([torch.zeros_like(f[:, :1]), f[:, 1:] - f[:, :-1]], dim=1)
        return torch.relu(self.proj(self.dropout(torch.cat([f, delta], dim=-1))))

    def _shifted(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Training only: each clip moved by up to ``shift`` pixels across and down, the same
        for all its frames (its motion is kept), the edge mirrored into the gap. A CNN from
        scratch on a few hundred clips otherwise learns where things are in them, not what."""
        s, (h, w) = self.shift, x.shape[-2:]
        clips = nn.functional.pad(x.reshape(b, -1, h, w), (s, s, s, s), mode="reflect")
        dy, dx = torch.randint(0, 2 * s + 1, (2, b)).tolist()
        return torch.stack([c[:, y : y + h, x_ : x_ + w] for c, y, x_ in zip(clips, dy, dx)]).reshape(x.shape)


class Encoder(nn.Module):
    def __init__(self, embedding: nn.Module, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.embedding = embedding  # token embedding (text) or FrameInput (video)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            embedding.embedding_dim,
            hidden_size // 2,
            num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, src: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, LSTMState]:
        """src (B, S) ids or (B, K, ...) frames, src_lens (B,) -> outputs (B, S, H), final (h, c) each (L, B, H)."""
        x = self.dropout(self.embedding(src))
        packed = pack_padded_sequence(x, src_lens.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))

        def merge(s: torch.Tensor) -> torch.Tensor:  # (2L, B, H/2) -> (L, B, H): fwd and bwd side by side
            layers2, b, half = s.shape
            return s.view(layers2 // 2, 2, b, half).transpose(1, 2).reshape(layers2 // 2, b, 2 * half)

        return out, (merge(h), merge(c))


class Decoder(nn.Module):
    def __init__(
        self,
        embedding: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        attention: str,
        input_feeding: bool,
        tie_embeddings: bool,
    ):
        super().__init__()
        emb_size = embedding.embedding_dim
        self.embedding = embedding
        self.input_feeding = input_feeding
        self.hidden_size = hidden_size
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            emb_size + (hidden_size if input_feeding else 0),
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.attention = Attention(hidden_size, attention)
        self.combine = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        # Tied: project the attentional vector into embedding space and score against the
        # embedding matrix, which saves V*H parameters and regularises small corpora.
        self.to_embedding = nn.Linear(hidden_size, emb_size, bias=False) if tie_embeddings else None
        self.generator = nn.Linear(emb_size if tie_embeddings else hidden_size, embedding.num_embeddings)
        if tie_embeddings:
            self.generator.weight = embedding.weight

    def _attend(
        self, h: torch.Tensor, keys: torch.Tensor, enc_out: torch.Tensor, src_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder states (B, T, H) -> attentional vectors (B, T, H), attention weights (B, T, S)."""
        ctx, weights = self.attention(h, keys, enc_out, src_mask)
        return torch.tanh(self.combine(torch.cat([ctx, h], dim=-1))), weights

    def features(self, attn_h: torch.Tensor) -> torch.Tensor:
        """Attentional vectors (..., H) -> generator inputs (..., E or H)."""
        x = self.dropout(attn_h)
        return self.to_embedding(x) if self.to_embedding is not None else x

    def forward(
        self, tgt_in: torch.Tensor, enc_out: torch.Tensor, src_mask: torch.Tensor, state: LSTMState
    ) -> torch.Tensor:
        """Teacher forcing over the whole target: tgt_in (B, T) -> features (B, T, E)."""
        keys = self.attention.keys(enc_out)
        x = self.dropout(self.embedding(tgt_in))
        if not self.input_feeding:
            out, _ = self.lstm(x, state)
            return self.features(self._attend(out, keys, enc_out, src_mask)[0])
        prev = x.new_zeros(x.size(0), 1, self.hidden_size)
        steps = []
        for t in range(x.size(1)):
            out, state = self.lstm(torch.cat([x[:, t : t + 1], prev], dim=-1), state)
            prev = self._attend(out, keys, enc_out, src_mask)[0]
            steps.append(prev)
        return self.features(torch.cat(steps, dim=1))

    def step(
        self,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        enc_out: torch.Tensor,
        src_mask: torch.Tensor,
        state: LSTMState,
        prev: torch.Tensor | None,
    ) -> tuple[torch.Tensor, LSTMState, torch.Tensor, torch.Tensor]:
        """One decoding step: tokens (B,) -> log-probs (B, V), new state, attentional vector
        (B, 1, H), attention weights over the source (B, 1, S)."""
        x = self.dropout(self.embedding(tokens).unsqueeze(1))
        if self.input_feeding:
            if prev is None:
                prev = x.new_zeros(x.size(0), 1, self.hidden_size)
            x = torch.cat([x, prev], dim=-1)
        out, state = self.lstm(x, state)
        attn_h, weights = self._attend(out, keys, enc_out, src_mask)
        logits = self.generator(self.features(attn_h)).squeeze(1)
        return torch.log_softmax(logits.float(), dim=-1), state, attn_h, weights


class Seq2Seq(nn.Module):
    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        attention: str = "general",
        input_feeding: bool = False,
        tie_embeddings: bool = True,
        joint_vocab: bool = False,
        pad_id: int = 0,
        bos_id: int = 2,
        eos_id: int = 3,
        src_input: nn.Module | None = None,
    ):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even (bidirectional encoder), got {hidden_size}")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_size, padding_idx=pad_id)
        if src_input is not None:
            src_embedding = nn.Identity()  # placeholder until after the init below
            src_embedding.embedding_dim = src_input.embedding_dim
        elif joint_vocab and src_vocab_size == tgt_vocab_size:
            src_embedding = tgt_embedding  # one vocabulary: share the table across both sides
        else:
            src_embedding = nn.Embedding(src_vocab_size, embedding_size, padding_idx=pad_id)
        self.encoder = Encoder(src_embedding, hidden_size, num_layers, dropout)
        self.decoder = Decoder(
            tgt_embedding, hidden_size, num_layers, dropout, attention, input_feeding, tie_embeddings
        )
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            for emb in {id(src_embedding): src_embedding, id(tgt_embedding): tgt_embedding}.values():
                if isinstance(emb, nn.Embedding):
                    emb.weight[pad_id].zero_()
        if src_input is not None:  # keeps PyTorch's own (fan-in scaled) init: a CNN needs it
            self.encoder.embedding = src_input

    def encode(self, src: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, LSTMState]:
        enc_out, state = self.encoder(src, src_lens)
        src_mask = torch.arange(src.size(1), device=src.device).unsqueeze(0) < src_lens.to(src.device).unsqueeze(1)
        return enc_out, src_mask, state

    def features(
        self, src: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor, src_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The generator's input features (B, T, E) under teacher forcing.

        ``src_index`` (B,) maps each target to its row of ``src`` when sources repeat (a
        video with several captions): each distinct source is encoded once.
        """
        enc_out, src_mask, (h, c) = self.encode(src, src_lens)
        if src_index is not None:
            enc_out, src_mask, h, c = enc_out[src_index], src_mask[src_index], h[:, src_index], c[:, src_index]
        return self.decoder(tgt_in, enc_out, src_mask, (h, c))

    def forward(
        self,
        src: torch.Tensor,
        src_lens: torch.Tensor,
        tgt_in: torch.Tensor,
        tgt_out: torch.Tensor,
        label_smoothing: float = 0.0,
        src_index: torch.Tensor | None = None,
        real_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over real target tokens, and their count.

        The loss is the forward pass so that DDP's wrapper sees it. Logits are computed
        only at non-pad positions: with length-bucketed batches that skips the padding,
        and the (N, V) projection is the largest tensor of the step. ``real_index`` (N,)
        gives those positions in the flattened (B, T) targets; without it they are found
        with a boolean mask, whose size the host must wait for on a GPU.
        """
        feats = self.features(src, src_lens, tgt_in, src_index)
        real = tgt_out != self.pad_id
        if real_index is None:
            feats, targets = feats[real], tgt_out[real]
        else:  # the same rows in the same order
            feats = feats.flatten(0, 1).index_select(0, real_index)
            targets = tgt_out.flatten().index_select(0, real_index)
        logits = self.decoder.generator(feats)
        loss = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
        return loss, real.sum()

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, src_lens: torch.Tensor, max_len: int) -> list[list[int]]:
        """Batched greedy decoding -> token ids per sentence (or clip), without BOS/EOS."""
        return self._greedy(src, src_lens, max_len, False)[0]

    @torch.no_grad()
    def greedy_attention(
        self, src: torch.Tensor, src_lens: torch.Tensor, max_len: int
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy decoding that keeps the attention: token ids per source (as :meth:`greedy`)
        and, per source, the weights (T_i, S_i) of each output token (and EOS, when emitted)
        over that source's real positions."""
        ids, weights = self._greedy(src, src_lens, max_len, True)
        lens = src_lens.tolist()
        return ids, [w[: min(len(i) + 1, w.size(0)), : lens[r]] for r, (i, w) in enumerate(zip(ids, weights))]

    def _greedy(
        self, src: torch.Tensor, src_lens: torch.Tensor, max_len: int, keep_weights: bool
    ) -> tuple[list[list[int]], torch.Tensor | None]:
        enc_out, src_mask, state = self.encode(src, src_lens)
        keys = self.decoder.attention.keys(enc_out)
        b = src.size(0)
        tokens = torch.full((b,), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        out, prev, kept = [], None, []
        for _ in range(max_len):
            logp, state, prev, weights = self.decoder.step(tokens, keys, enc_out, src_mask, state, prev)
            if keep_weights:
                kept.append(weights.float().cpu())
            tokens = logp.argmax(-1)
            out.append(tokens.masked_fill(done, self.pad_id))
            done |= tokens == self.eos_id
            if bool(done.all()):
                break
        ids = [self._strip(row) for row in torch.stack(out, 1).tolist()]
        return ids, torch.cat(kept, dim=1) if keep_weights else None

    def _strip(self, ids: list[int]) -> list[int]:
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return [i for i in ids if i != self.pad_id]

    @torch.no_grad()
    def beam_search(
        self, src: torch.Tensor, src_lens: torch.Tensor, max_len: int, beam_size: int = 4, length_penalty: float = 0.6
    ) -> list[list[int]]:
        """Batched beam search with the GNMT length penalty ((5 + len) / 6) ** alpha.

        Each sentence keeps ``beam_size`` live hypotheses; one that emits EOS is set aside
        as finished. A sentence is done when it has ``beam_size`` finished hypotheses.
        With ``beam_size=1`` this returns exactly what :meth:`greedy` returns.
        """
        k = beam_size
        enc_out, src_mask, (h, c) = self.encode(src, src_lens)
        b, dev = src.size(0), src.device
        enc_out = enc_out.repeat_interleave(k, 0)
        src_mask = src_mask.repeat_interleave(k, 0)
        state = (h.repeat_interleave(k, 1), c.repeat_interleave(k, 1))
        keys = self.decoder.attention.keys(enc_out)
        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep only one alive at first
        tokens = torch.full((b * k,), self.bos_id, dtype=torch.long, device=dev)
        history = torch.empty(b * k, 0, dtype=torch.long, device=dev)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        prev = None

        def penalty(length: int) -> float:
            return ((5.0 + length) / 6.0) ** length_penalty

        for t in range(max_len):
            logp, state, prev, _ = self.decoder.step(tokens, keys, enc_out, src_mask, state, prev)
            vocab = logp.size(-1)
            cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
            top_scores, top_ids = cand.topk(min(2 * k, k * vocab), dim=-1)
            beam_of, token_of = top_ids // vocab, top_ids % vocab
            is_eos = token_of == self.eos_id
            if t == max_len - 1:
                is_eos = torch.ones_like(is_eos)  # out of room: everything finishes here
            for i, j in is_eos.nonzero().tolist():
                if len(finished[i]) < k and j < k:  # only candidates ranked in the top k
                    seq = history[i * k + beam_of[i, j]].tolist()
                    if token_of[i, j] != self.eos_id:
                        seq = seq + [int(token_of[i, j])]
                    finished[i].append((float(top_scores[i, j]) / penalty(len(seq) + 1), seq))
            if all(len(f) >= k for f in finished):
                break
            alive = top_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=-1).indices  # (b, k)
            scores = top_scores.gather(1, alive)
            src_beam = (beam_of.gather(1, alive) + torch.arange(b, device=dev).unsqueeze(1) * k).view(-1)
            tokens = token_of.gather(1, alive).view(-1)
            history = torch.cat([history[src_beam], tokens.unsqueeze(1)], dim=1)
            state = (state[0][:, src_beam], state[1][:, src_beam])
            prev = prev[src_beam]
        return [self._strip(max(f, key=lambda s: s[0])[1]) for f in finished]
