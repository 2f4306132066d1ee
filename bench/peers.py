"""The peer, side by side: OpenNMT-py 3.5.1 (its own tools, its own venv) and `pipeline train`
on Multi30k En->De, one after the other on this machine, the same wall-clock budget each.

Both: hidden 256, 2+2 layers, a joint 8k BPE; each with its usual recipe. OpenNMT-py: `brnn`
encoder, general attention, Adam 1e-3, 3,000-token batches, label smoothing 0.1, a
SentencePiece BPE model; run twice, with input feeding (its default) and without (its faster
setting). It has no wall-clock stop: it saves a checkpoint every `--save-steps` steps and is
stopped by a timeout; its last checkpoint is scored. Ours: `pipeline train data=multi30k
train.max_minutes=M` (its defaults, 2 workers). Every run is scored the same way: sacreBLEU
(and chrF) of the detokenised test_2016_flickr output against the raw references, beam 4.
Target tokens/s: OpenNMT-py's report lines (non-pad target tokens, a window each), ours the
logged `train_tokens_per_s` windows; the median of each, the first window left out.

    python bench/peers.py --multi30k ../shared/data/multi30k [--minutes 12] [--work DIR]
        [--runs feed,nofeed,ours] [--json FILE]

The first run builds the peer's venv under --work (torch 2.13.0 from this machine's disk,
opennmt-py without its pinned torch, its runtime imports); later runs reuse it. Its
checkpoints pickle an argparse.Namespace, so only its own `onmt_translate` gets
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (in that subprocess's environment; never our code).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ONMT = "opennmt-py==3.5.1"
ONMT_RUNTIME = [
    "configargparse",
    "pyonmttok",
    "ctranslate2>=4,<5",
    "sentencepiece",
    "sacrebleu",
    "six",
    "spacy",
    "pyahocorasick",
    "fasttext-wheel",
    "tensorboard",
    "flask",
    "waitress",
    "rapidfuzz",
    "pyyaml",
]
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
# One report line of onmt_train: "... Step 50/1000000; acc: ...; 3141/4398 tok/s; 61 sec; ..."
REPORT = re.compile(r"Step (\d+)/\s*\d+;.*?(\d+)/\s*(\d+) tok/s;\s*(\d+) sec")


def say(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def peer_venv(work: Path) -> Path:
    """The peer's own venv (built once): its bin folder."""
    venv = work / "onmt-venv"
    bin_dir = venv / "bin"
    if (bin_dir / "onmt_train").exists():
        return bin_dir
    say(f"building OpenNMT-py's venv in {venv} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "--no-deps", ONMT], check=True)
    subprocess.run([*pip, *ONMT_RUNTIME], check=True)
    return bin_dir


def raw_text(multi30k: Path, work: Path) -> dict[str, dict[str, Path]]:
    """Multi30k's gzip files as the plain text OpenNMT-py reads."""
    out: dict[str, dict[str, Path]] = {}
    (work / "text").mkdir(parents=True, exist_ok=True)
    for role, split in SPLITS.items():
        out[role] = {}
        for lang in ("en", "de"):
            dst = work / "text" / f"{split}.{lang}"
            if not dst.exists():
                with gzip.open(multi30k / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                    dst.write_text(f.read(), encoding="utf-8")
            out[role][lang] = dst
    return out


def quiet(cmd: list[str], **kw) -> None:
    """One of the peer's own commands, its output (its log has it) not on our console."""
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def peer_python(bin_dir: Path, code: str, *args: str) -> None:
    subprocess.run([str(bin_dir / "python"), "-c", code, *args], check=True)


SPM_TRAIN = """
import sys, sentencepiece as spm
spm.SentencePieceTrainer.train(input=sys.argv[1] + ',' + sys.argv[2], model_prefix=sys.argv[3],
    vocab_size=8000, model_type='bpe', character_coverage=1.0, input_sentence_size=10**7)
"""
SPM_ENCODE = """
import sys, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
with open(sys.argv[2], encoding='utf-8') as f, open(sys.argv[3], 'w', encoding='utf-8') as o:
    for line in f:
        o.write(' '.join(sp.encode(line.rstrip('\\n'), out_type=str)) + '\\n')
"""
SPM_DECODE = """
import sys, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
with open(sys.argv[2], encoding='utf-8') as f, open(sys.argv[3], 'w', encoding='utf-8') as o:
    for line in f:
        o.write(sp.decode(line.split()) + '\\n')
"""


def peer_config(work: Path, text: dict, spm_model: Path, name: str, input_feed: bool, save_steps: int) -> Path:
    """OpenNMT-py's YAML for one run (JSON is YAML)."""
    run = work / name
    run.mkdir(parents=True, exist_ok=True)
    conf = {
        "save_data": str(work / "vocab" / "run"),
        "src_vocab": str(work / "vocab" / "vocab.src"),
        "tgt_vocab": str(work / "vocab" / "vocab.tgt"),
        "share_vocab": True,
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": str(text["train"]["en"]), "path_tgt": str(text["train"]["de"])},
            "valid": {"path_src": str(text["valid"]["en"]), "path_tgt": str(text["valid"]["de"])},
        },
        "transforms": ["sentencepiece"],
        "src_subword_model": str(spm_model),
        "tgt_subword_model": str(spm_model),
        "src_seq_length": 200,
        "tgt_seq_length": 200,
        "encoder_type": "brnn",
        "decoder_type": "rnn",
        "rnn_type": "LSTM",
        "layers": 2,
        "hidden_size": 256,
        "word_vec_size": 256,
        "global_attention": "general",
        "input_feed": 1 if input_feed else 0,
        "dropout": [0.3],
        "optim": "adam",
        "learning_rate": 0.001,
        "batch_type": "tokens",
        "batch_size": 3000,
        "valid_batch_size": 64,
        "label_smoothing": 0.1,
        "train_steps": 10_000_000,  # the timeout stops it
        "valid_steps": 10_000_000,
        "save_model": str(run / "model"),
        "save_checkpoint_steps": save_steps,
        "keep_checkpoint": 2,
        "report_every": 50,
        "seed": 1234,
        "world_size": 1,
        "log_file": str(run / "train.log"),
    }
    path = run / "config.yaml"
    path.write_text(json.dumps(conf, indent=1))
    return path


def report_rates(log: str) -> list[float]:
    """Target tokens/s of each onmt_train report line."""
    return [float(m.group(3)) for m in REPORT.finditer(log)]


def median_after_first(rates: list[float]) -> float:
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else 0.0


def last_checkpoint(run: Path) -> Path | None:
    found = sorted(run.glob("model_step_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return found[-1] if found else None


def score(hyp: Path, ref: Path) -> dict[str, float]:
    import sacrebleu

    hyps = hyp.read_text(encoding="utf-8").splitlines()
    refs = ref.read_text(encoding="utf-8").splitlines()
    if len(hyps) != len(refs):
        raise SystemExit(f"{hyp}: {len(hyps)} lines for {len(refs)} references in {ref}")
    return {
        "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
    }


def run_peer(bin_dir: Path, work: Path, text: dict, spm_model: Path, name: str, feed: bool, args) -> dict:
    conf = peer_config(work, text, spm_model, name, feed, args.save_steps)
    run = conf.parent
    for old in run.glob("model_step_*.pt"):
        old.unlink()
    (run / "train.log").unlink(missing_ok=True)
    say(f"OpenNMT-py {name} (input_feed={int(feed)}): training for {args.minutes:g} minutes")
    t0 = time.time()
    try:
        quiet(
            [str(bin_dir / "onmt_train"), "-config", str(conf)],
            timeout=args.minutes * 60,
        )
    except subprocess.TimeoutExpired:
        pass  # its budget: subprocess.run has killed it
    trained_s = time.time() - t0
    ckpt = last_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"OpenNMT-py {name} saved no checkpoint in {args.minutes} minutes (see {run}/train.log)")
    rates = report_rates((run / "train.log").read_text(encoding="utf-8", errors="replace"))
    say(f"OpenNMT-py {name}: decoding the test split with {ckpt.name} (beam 4)")
    src_sp, out_sp, out = run / "test.en.sp", run / "test.de.sp", run / "test.de.hyp"
    peer_python(bin_dir, SPM_ENCODE, str(spm_model), str(text["test"]["en"]), str(src_sp))
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # the peer's own pickled checkpoints only
    t1 = time.time()
    quiet(
        [str(bin_dir / "onmt_translate"), "-model", str(ckpt), "-src", str(src_sp), "-output", str(out_sp)]
        + ["-beam_size", "4", "-batch_size", "32", "-batch_type", "sents", "-max_length", "100"],
        env=env,
        check=True,
    )
    decode_s = time.time() - t1
    peer_python(bin_dir, SPM_DECODE, str(spm_model), str(out_sp), str(out))
    return {
        "run": f"opennmt-py {name}",
        "input_feed": feed,
        "steps": int(ckpt.stem.rsplit("_", 1)[1]),
        "trained_s": round(trained_s, 1),
        "tokens_per_s": round(median_after_first(rates), 1),
        "windows": len(rates),
        "decode_s": round(decode_s, 1),
        **score(out, text["test"]["de"]),
    }


def run_ours(multi30k: Path, work: Path, text: dict, args) -> dict:
    from mlflow.tracking import MlflowClient

    ours = work / "ours"
    if ours.exists():
        shutil.rmtree(ours)
    uri = f"sqlite:///{ours}/mlflow.db"
    cmd = [
        str(Path(sys.executable).with_name("pipeline")),
        "train",
        "data=multi30k",
        f"data.root={multi30k}",
        f"data.output_dir={ours}/data",
        f"train.storage_path={ours}/ray",
        f"tracking.tracking_uri={uri}",
        "train.run_name=peers-ours",
        "train.num_workers=2",
        f"train.max_minutes={args.minutes}",
        *args.overrides,
    ]
    say(f"ours: {' '.join(cmd[1:])}")
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall_s = time.time() - t0
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("pipeline").experiment_id])
    history = c.get_metric_history(run.info.run_id, "train_tokens_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    m = run.data.metrics
    # The same scoring as the peer's: sacreBLEU over the detokenised outputs the run logged
    # (test/outputs.json, in the test file's order) against the raw reference file.
    from pipeline.review import test_outputs

    hyp = ours / "test.de.hyp"
    hyp.write_text("".join(h + "\n" for h in test_outputs(uri, run.info.run_id)["translation"]), encoding="utf-8")
    return {
        "run": "pipeline train",
        "steps": max((h.step for h in history), default=0),  # the last logged window's step
        "tokens_per_s": round(median_after_first(rates), 1),
        "windows": len(rates),
        "logged_test_bleu": round(m["test_bleu"], 2),
        "wall_s": round(wall_s, 1),
        **score(hyp, text["test"]["de"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--multi30k", type=Path, required=True, help="Multi30k task 1 files ({split}.{lang}.gz)")
    ap.add_argument("--minutes", type=float, default=12.0, help="training budget of each run")
    ap.add_argument(
        "--work", type=Path, default=Path("~/.cache/pipeline-peers").expanduser(), help="the peer's venv and all runs"
    )
    ap.add_argument("--runs", default="feed,nofeed,ours", help="which of feed, nofeed, ours, in that order")
    ap.add_argument("--save-steps", type=int, default=100, help="the peer's checkpoint interval (steps)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("overrides", nargs="*", help="extra overrides for our run")
    args = ap.parse_args()
    runs = args.runs.split(",")
    if bad := [r for r in runs if r not in ("feed", "nofeed", "ours")]:
        ap.error(f"--runs: unknown {','.join(bad)} (feed, nofeed, ours)")
    multi30k = args.multi30k.resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = raw_text(multi30k, work)
    results = []
    if {"feed", "nofeed"} & set(runs):
        bin_dir = peer_venv(work)
        spm_model = work / "spm" / "joint8k.model"
        if not spm_model.exists():
            spm_model.parent.mkdir(exist_ok=True)
            say("training OpenNMT-py's joint SentencePiece BPE (8,000) on the training split")
            peer_python(bin_dir, SPM_TRAIN, str(text["train"]["en"]), str(text["train"]["de"]), str(spm_model)[:-6])
        conf = peer_config(work, text, spm_model, "vocab", True, args.save_steps)
        quiet(
            [str(bin_dir / "onmt_build_vocab"), "-config", str(conf), "-n_sample", "-1"],
            check=True,
        )
        for name in ("feed", "nofeed"):
            if name in runs:
                results.append(run_peer(bin_dir, work, text, spm_model, name, name == "feed", args))
                say(json.dumps(results[-1]))
    if "ours" in runs:
        results.append(run_ours(multi30k, work, text, args))
        say(json.dumps(results[-1]))
    out = {"bench": "peers", "minutes": args.minutes, "runs": results}
    peers = [r for r in results if r["run"].startswith("opennmt")]
    mine = [r for r in results if r["run"] == "pipeline train"]
    if peers and mine:
        best = max(peers, key=lambda r: r["bleu"])
        out["better_peer"] = best["run"]
        out["bleu_ours_over_peer"] = round(mine[0]["bleu"] / max(best["bleu"], 1e-9), 3)
        out["tokens_per_s_ours_over_peer"] = round(mine[0]["tokens_per_s"] / max(best["tokens_per_s"], 1e-9), 3)
        fastest = max(peers, key=lambda r: r["tokens_per_s"])
        out["tokens_per_s_ours_over_fastest_peer"] = round(
            mine[0]["tokens_per_s"] / max(fastest["tokens_per_s"], 1e-9), 3
        )
    print(json.dumps(out, indent=1))
    for r in results:
        print(
            f"{r['run']:<22} test BLEU {r['bleu']:6.2f}  chrF {r['chrf']:6.2f}  {r['tokens_per_s']:9.0f} target tokens/s"
        )
    if "better_peer" in out:
        print(
            f"ours / {out['better_peer']}: BLEU {out['bleu_ours_over_peer']:.2f}x, "
            f"target tokens/s {out['tokens_per_s_ours_over_peer']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
