"""Does the captioner carry to a video corpus it was not tuned on? Per-attribute accuracy.

Writes a corpus with the second generator (``style="noise"``: other shapes, colours, sizes,
words, templates, frame size and count than the demo's, on fresh noise every frame) in the
MSR-VTT layout, trains ``pipeline train data=msrvtt data.root=DIR`` on it for a budget with
the given overrides (none: the defaults a user gets), then captions every test clip with the
best model and reads back what each caption says: the accuracy of shape, colour, size and
direction, next to the run's test CIDEr-D / BLEU-4 and what a perfect captioner (one
reference of each clip, scored against all of them) gets on the same split.

    python bench/video_carry.py [--minutes 15] [--train 600] [--style noise] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from collections import Counter

ATTRS = ("shape", "colour", "size", "direction")


def attribute_accuracy(hyps: list[str], truth: list[dict[str, str]], style: str) -> dict[str, float]:
    """Fraction of clips whose caption names each attribute's true value (a missing one is wrong)."""
    from pipeline.data.synthetic_video import parse_caption

    parsed = [parse_caption(h, style) for h in hyps]
    return {a: sum(p.get(a) == t[a] for p, t in zip(parsed, truth)) / max(len(truth), 1) for a in ATTRS}


def confusions(hyps: list[str], truth: list[dict[str, str]], style: str, attr: str) -> dict[str, dict[str, int]]:
    """true value -> what the captions said (``-`` = nothing), for one attribute."""
    from pipeline.data.synthetic_video import parse_caption

    out: dict[str, Counter] = {}
    for h, t in zip(hyps, truth):
        out.setdefault(t[attr], Counter())[parse_caption(h, style).get(attr, "-")] += 1
    return {k: dict(v.most_common()) for k, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--train", type=int, default=600, help="training clips (val and test: a sixth each)")
    ap.add_argument("--style", default="noise")
    ap.add_argument("--frame-size", type=int, default=80, help="of the written clips")
    ap.add_argument("--frames", type=int, default=24, help="of the written clips")
    ap.add_argument("--workdir", default="", help="keep the corpus, data and runs here (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="key=value or group=option for pipeline train")
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.data.synthetic_video import clip_specs, write_demo_video
    from pipeline.inference import Captioner
    from pipeline.metrics import bleu4, cider_d
    from pipeline.train.run import fit_run, prepare

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="video-carry-"))
    corpus = work / f"{args.style}-{args.train}-{args.frame_size}x{args.frames}"
    n_eval = max(30, args.train // 6)
    if not (corpus / "train_val_videodatainfo.json").exists():
        t0 = time.time()
        write_demo_video(
            corpus, args.train, n_eval, n_eval, seed=11, size=args.frame_size, num_frames=args.frames, fps=12,
            style=args.style,
        )  # fmt: skip
        print(f"[bench] wrote {args.train}/{n_eval}/{n_eval} clips to {corpus} in {time.time() - t0:.0f} s", flush=True)
    cfg = load_config(
        [
            "data=msrvtt",
            f"data.root={corpus}",
            f"data.output_dir={work}/data",
            f"train.storage_path={work}/runs",
            f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            f"train.max_minutes={args.minutes}",
            *args.overrides,
        ]
    )
    t0 = time.time()
    res = fit_run(cfg, prepare(cfg), f"carry-{time.strftime('%H%M%S')}")
    wall = time.time() - t0

    specs = [s for s in clip_specs(args.train, n_eval, n_eval, 11, args.style) if s.split == "test"]
    truth = [{a: getattr(s, a) for a in ATTRS} for s in specs]
    doc = json.loads((corpus / "train_val_videodatainfo.json").read_text())
    refs: dict[str, list[str]] = {}
    for s in doc["sentences"]:
        refs.setdefault(s["video_id"], []).append(s["caption"])
    cap = Captioner.load(res["best_dir"])
    clips = cap.load_clips([str(corpus / "videos" / f"{s.video_id}.mp4") for s in specs])
    hyps = cap.caption(clips, beam_size=cfg.train.test_beam_size)
    test_refs = [refs[s.video_id] for s in specs]
    out = {
        "corpus": {
            "style": args.style,
            "train_clips": args.train,
            "frame_size": args.frame_size,
            "frames": args.frames,
        },
        "overrides": args.overrides,
        "minutes": args.minutes,
        "wall_s": round(wall, 1),
        "test_cider_d": round(cider_d(hyps, test_refs), 3),
        "test_bleu4": round(bleu4(hyps, test_refs), 3),
        "perfect_cider_d": round(cider_d([r[0] for r in test_refs], test_refs), 3),
        "accuracy": {a: round(v, 3) for a, v in attribute_accuracy(hyps, truth, args.style).items()},
        "chance": {a: round(1 / len({t[a] for t in truth}), 3) for a in ATTRS},
        "confusions": {a: confusions(hyps, truth, args.style, a) for a in ATTRS},
        "shape_accuracy_by_size": {
            size: attribute_accuracy(*zip(*[(h, t) for h, t in zip(hyps, truth) if t["size"] == size]), args.style)[
                "shape"
            ]
            for size in sorted({t["size"] for t in truth})
        },
        "batch_tokens": cfg.train.batch_tokens,
        "samples": [{"caption": h, "truth": t} for h, t in list(zip(hyps, truth))[:6]],
        "run": {k: res.get(k) for k in ("run_name", "best_dir", "train_seconds")},
    }
    print(json.dumps(out, indent=1))
    acc = out["accuracy"]
    print(
        f"[bench] {args.style} corpus, {args.minutes:g} min: test CIDEr-D {out['test_cider_d']} "
        f"(perfect {out['perfect_cider_d']}), BLEU-4 {out['test_bleu4']}; accuracy "
        + ", ".join(f"{a} {acc[a]:.2f}" for a in ATTRS)
    )


if __name__ == "__main__":
    main()
