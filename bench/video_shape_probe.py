"""Can the captioner's frame CNN tell the shapes apart on a corpus it was not tuned on?

The video encoder's input module (``FrameInput``: the CNN and its "what"/"where" read-outs)
with a linear head, trained alone as a per-frame shape classifier on clips of the second
generator (``style="noise"``), one process: a probe of what the input and the CNN can see,
without the LSTMs. Prints validation shape accuracy per epoch and per object size, for
each frame size asked (decoded from the same clips as preprocessing decodes them).

    python bench/video_shape_probe.py [--frame-sizes 64,80] [--epochs 8] [--train 600]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from torch import nn


def frames_of(corpus: str, specs, num_frames: int, frame_size: int) -> np.ndarray:
    from pipeline.data.video import decode_clip

    out = []
    for s in specs:
        with open(f"{corpus}/videos/{s.video_id}.mp4", "rb") as f:
            out.append(decode_clip(f.read(), num_frames, frame_size))
    return np.stack(out)  # (N, K, S, S, 3)


def probe(train_x, train_y, val_x, val_y, val_sizes, epochs: int, channels: int, seed: int = 0) -> list[dict]:
    from pipeline.models.seq2seq import FrameInput

    torch.manual_seed(seed)
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    net = FrameInput("frames", 128, 0.1, channels=channels)
    head = nn.Linear(128, n_classes)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, epochs + 1):
        net.train()
        t0 = time.perf_counter()
        for idx in np.array_split(rng.permutation(len(train_x)), max(1, len(train_x) // 16)):
            x = torch.from_numpy(train_x[idx])  # (B, K, S, S, 3): every frame of the clip
            logits = head(net(x).mean(1))  # pooled over frames, as the encoder sees them all
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(train_y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = head(net(torch.from_numpy(val_x)).mean(1)).argmax(-1).numpy()
        by_size = {s: float((pred == val_y)[val_sizes == s].mean()) for s in sorted(set(val_sizes))}
        history.append(
            {"epoch": epoch, "val_acc": round(float((pred == val_y).mean()), 3), "by_size": by_size,
             "epoch_s": round(time.perf_counter() - t0, 1)}
        )  # fmt: skip
        print(json.dumps(history[-1]), flush=True)
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frame-sizes", default="64,80")
    ap.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--corpus", default="", help="a noise corpus written with seed 11 (default: write one)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from pipeline.data.synthetic_video import NOISE, clip_specs, write_demo_video

    n_eval = max(30, args.train // 6)
    corpus = args.corpus
    if not corpus:
        corpus = tempfile.mkdtemp(prefix="shape-probe-")
        write_demo_video(corpus, args.train, n_eval, n_eval, seed=11, size=80, num_frames=24, fps=12, style="noise")
    specs = clip_specs(args.train, n_eval, n_eval, 11, "noise")
    train = [s for s in specs if s.split == "train"]
    val = [s for s in specs if s.split == "val"]
    label = {shape: i for i, shape in enumerate(NOISE.shapes)}
    results = {}
    for size in (int(s) for s in args.frame_sizes.split(",")):
        tx, vx = frames_of(corpus, train, args.frames, size), frames_of(corpus, val, args.frames, size)
        ty = np.array([label[s.shape] for s in train])
        vy = np.array([label[s.shape] for s in val])
        print(f"[probe] frame_size {size}: {len(train)} training clips, {len(val)} validation clips", flush=True)
        results[size] = probe(tx, ty, vx, vy, np.array([s.size for s in val]), args.epochs, args.channels)
    print(
        json.dumps({"frames": args.frames, "channels": args.channels, "final": {k: v[-1] for k, v in results.items()}})
    )


if __name__ == "__main__":
    main()
