"""The MLflow hand-off end to end: a strong sweep, then a weak one, into one registered
model, then the champion served by `mlflow models serve` and timed.

    python bench/handoff.py [--out DIR]

1. A 2-trial sweep (hidden 64/96, 3 epochs) on the demo corpus registers its best as
   `challenger`; with no champion yet it becomes `champion`.
2. A weaker 1-trial sweep (hidden 8, 1 epoch) on the same data registers a new
   `challenger`; the gate keeps `champion` where it is and says why.
3. `mlflow models serve -m models:/NAME@champion --env-manager local` (nothing of ours on
   its path but the model's own code) answers `/invocations` for 1 and for 64 sentences;
   the request, the response and the time from request to response are printed.

Prints the champion version before and after the weak sweep, the gate's message, the
serve timings, and a JSON line with all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the sweeps of tests/test_tune.py, same small config

# Sentences of the demo language (pipeline.data.synthetic), which the demo models are trained on.
SENTENCES = ["the queen thanks tom .", "a happy park jumps behind the ships .", "the small dog sees the red house ."]


def sweep(tmp: Path, uri: str, name: str, extra: list[str]) -> dict:
    from test_tune import base_overrides

    from pipeline.config import load_config
    from pipeline.tune import run_sweep

    base = base_overrides(tmp, uri, "handoff") + [
        "tune.search=grid",
        "tune.scheduler=none",
        "tune.max_concurrent_trials=1",
        "tune.register_as=handoff-demo",
        f"tune.name={name}",
    ]
    return run_sweep(load_config(base + extra))


def post(url: str, body: dict) -> tuple[int, str, float]:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)  # noqa: S310 (127.0.0.1)
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:  # noqa: S310 (our own server on 127.0.0.1)
        return r.status, r.read().decode(), time.perf_counter() - t0


def serve(uri: str, model: str, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    log = open(tmp / "serve.log", "w")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "serve.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("mlflow models serve did not answer /ping within 300 s")
            time.sleep(1)
        one = {"inputs": SENTENCES[:1]}
        status, text, one_s = post(f"{base}/invocations", one)
        print(f"POST /invocations {json.dumps(one)}\n-> {status} {text}")
        many = {"inputs": [SENTENCES[i % len(SENTENCES)] for i in range(64)]}
        status64, text64, many_s = post(f"{base}/invocations", many)
        print(f"POST /invocations (64 sentences) -> {status64}, first: {json.loads(text64)['predictions'][0]!r}")
        print(f"request to response: 1 sentence {one_s * 1000:.0f} ms, 64 sentences {many_s * 1000:.0f} ms (beam 4)")
        return {"status": status, "response_1": json.loads(text), "ms_1": one_s * 1000, "ms_64": many_s * 1000}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(30)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    args = ap.parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="handoff-")).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp}/mlflow.db"
    strong = sweep(tmp, uri, "strong", ["tune.space.model.hidden_size=[64,96]", "train.max_epochs=3"])
    print(f"[handoff] strong sweep: {strong['promotion']} (champion v{strong['champion_version']})", flush=True)
    weak = sweep(tmp, uri, "weak", ["tune.space.model.hidden_size=[8]", "train.max_epochs=1"])
    print(f"[handoff] weak sweep: {weak['promotion']} (champion v{weak['champion_version']})", flush=True)
    served = serve(uri, "models:/handoff-demo@champion", tmp)
    out = {
        "strong": {k: strong.get(k) for k in ("registered_version", "champion_version", "promotion", "test_bleu")},
        "weak": {k: weak.get(k) for k in ("registered_version", "champion_version", "promotion", "test_bleu")},
        "serve": served,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
