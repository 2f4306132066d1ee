"""Peak memory of ``pipeline preprocess data=demo_video`` on the demo corpus and on 4x it.

The corpus of each size is generated first (as ``ensure_demo_video`` would, same seed and
eval sizes), outside the measurement. Then ``python -m pipeline.cli preprocess`` runs in its
own process with its own local Ray cluster, no feature cache (every clip is decoded), and
the proportional set size (PSS) of that process and everything it started (Ray's GCS,
raylet, the Ray Data workers and the object store's shared pages, which PSS counts once)
is summed every 0.3 s; the peak of that sum is the figure. A streaming pass should need
about the same memory at 4x as at 1x; holding every decoded clip grows with the corpus.

Prints JSON and a one-line summary.

    python bench/video_preprocess_memory.py [--demo-size 1200] [--factor 4] [--corpus DIR]

``--corpus DIR`` keeps the generated corpora in DIR and reuses them on the next run (the 4x
corpus takes minutes to generate on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preprocess import _tree_pss


def generate(root: str, demo_size: int) -> float:
    from pipeline.config import load_config
    from pipeline.data.synthetic_video import write_demo_video

    cfg = load_config(["data=demo_video", f"data.root={root}", f"data.demo_size={demo_size}"]).data
    n_eval = max(50, cfg.demo_size // 12)  # as ensure_demo_video
    t0 = time.time()
    write_demo_video(root, n_train=cfg.demo_size, n_val=n_eval, n_test=n_eval, seed=1234)
    return time.time() - t0


def peak_memory(root: str, demo_size: int, out: str) -> tuple[int, float, dict]:
    """(peak PSS of the preprocess process tree in bytes, seconds, the printed summary)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster: all of it is counted
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "preprocess",
            "data=demo_video",
            f"data.root={root}",
            f"data.demo_size={demo_size}",
            f"data.output_dir={out}",
            "data.feature_cache=",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.time()
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        peak = max(peak, _tree_pss(ps))
        time.sleep(0.3)
    stdout, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(err[-3000:])
    summary = json.loads(stdout[stdout.index("{\n") :])
    return peak, time.time() - t0, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-size", type=int, default=1200, help="training clips at 1x (conf/data/demo_video.yaml)")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--corpus", default="", help="keep (and reuse) the generated corpora here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for label, n in (("x1", args.demo_size), (f"x{args.factor}", args.demo_size * args.factor)):
            corpus = f"{args.corpus or tmp}/{label}-{n}"
            done = os.path.exists(f"{corpus}/train_val_videodatainfo.json")  # written after every clip
            gen_s = 0.0 if done else generate(corpus, n)
            peak, sec, summary = peak_memory(corpus, n, f"{tmp}/out-{label}")
            res[label] = {
                "demo_size": n,
                "captions_read": summary["rows_read"],
                "peak_pss_mb": round(peak / 2**20),
                "seconds": round(sec, 1),
                "generate_seconds": round(gen_s, 1),
            }
    big = f"x{args.factor}"
    out = {
        **res,
        "ratio": round(res[big]["peak_pss_mb"] / res["x1"]["peak_pss_mb"], 2),
        "method": "peak of the summed PSS of `pipeline preprocess` and its Ray cluster, sampled every 0.3 s",
    }
    print(json.dumps(out, indent=2))
    print(
        f"peak memory {res['x1']['peak_pss_mb']} MB at 1x ({args.demo_size} clips), {res[big]['peak_pss_mb']} MB at "
        f"{args.factor}x: {out['ratio']}x"
    )


if __name__ == "__main__":
    main()
