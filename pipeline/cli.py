"""Command line: parse, load the config, dispatch. No logic lives here.

    pipeline demo                       train on the embedded demo corpus (a few minutes)
    pipeline train [key=value ...]      preprocess if needed, train, test, log to MLflow
    pipeline preprocess [key=value ...] only the Ray Data preprocessing
    pipeline config [key=value ...]     print the resolved config
    pipeline translate --model M        stdin -> stdout
    pipeline evaluate --model M [...]   BLEU and chrF on a split
    pipeline download multi30k DIR      fetch the public Multi30k files
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config

EXAMPLES = """overrides: group=option (data=multi30k) or group.key=value (model.hidden_size=512);
`pipeline config` lists every key. Examples:
  pipeline train data=multi30k data.root=DIR train.max_minutes=12
  pipeline train train=gpu model=large data=multi30k data.root=DIR
"""

DEMO_OVERRIDES = ["data=demo_text", "model=small", "train=demo"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="LSTM encoder-decoder training on Ray, tracked in MLflow.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        return c

    for name, help in (("demo", "train end to end on the embedded demo corpus (data=demo_text, a few minutes on a CPU)"),
                       ("train", "preprocess (if needed), train on Ray Train, test, and log everything to MLflow"),
                       ("preprocess", "run the Ray Data preprocessing only and print the manifest"),
                       ("config", "print the resolved config as YAML")):
        c = cmd(name, help)
        c.add_argument("overrides", nargs="*", help="config overrides: key=value")
        if name == "preprocess":
            c.add_argument("--force", action="store_true", help="redo it even if a matching output exists")
    c = cmd("translate", "translate lines from stdin to stdout")
    c.add_argument("--model", required=True, help="model bundle folder (e.g. ray_results/RUN/best) or MLflow model URI (runs:/ID/model, models:/NAME@champion)")
    c.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    c.add_argument("--length-penalty", type=float, default=0.6)
    c.add_argument("--batch-size", type=int, default=64)
    c = cmd("evaluate", "BLEU and chrF of a model on a split of a corpus (config overrides pick the corpus)")
    c.add_argument("--model", required=True, help="model bundle folder or MLflow model URI")
    c.add_argument("--split", default="test", choices=["train", "val", "test"])
    c.add_argument("--beam", type=int, default=4)
    c.add_argument("--length-penalty", type=float, default=0.6)
    c.add_argument("overrides", nargs="*", help="config overrides: key=value")
    c = cmd("download", "download a public corpus (needs internet)")
    c.add_argument("corpus", choices=["multi30k"])
    c.add_argument("dest", help="destination folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - turn known user errors into one clear line
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2


def _user_error(e: BaseException) -> BaseException | None:
    from .data.readers import DataError
    from .tracking import TrackingError

    known = (ConfigError, DataError, TrackingError, FileNotFoundError, PermissionError, ConnectionError)
    seen = set()
    while e is not None and id(e) not in seen:  # Ray wraps worker errors; find ours inside
        seen.add(id(e))
        if isinstance(e, known):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "download":
        from .data.download import download_multi30k

        download_multi30k(args.dest)
        return 0
    if args.command == "translate":
        from .inference import Translator

        tr = Translator.load(args.model)
        lines = [line.rstrip("\n") for line in sys.stdin]
        for out in tr.translate(lines, args.beam, args.length_penalty, args.batch_size):
            print(out)
        return 0
    overrides = list(args.overrides)
    if args.command == "demo":
        overrides = DEMO_OVERRIDES + overrides
    cfg = load_config(overrides)
    if args.command == "config":
        print(cfg.to_yaml(), end="")
        return 0
    if args.command == "preprocess":
        from .data.preprocess import preprocess
        from .train.run import init_ray

        init_ray()
        out, manifest = preprocess(cfg.data, force=args.force)
        print(json.dumps({"output": out, **{k: manifest[k] for k in ("rows_read", "rows_kept", "dropped", "splits")}},
                         indent=2))
        return 0
    if args.command == "evaluate":
        from . import metrics
        from .data.preprocess import preprocess
        from .train.run import init_ray, translate_split

        init_ray()
        out, manifest = preprocess(cfg.data)
        res = translate_split(args.model, f"{out}/{args.split}", args.beam, args.length_penalty)
        print(json.dumps({"split": args.split, "sentences": len(res["hyp"]), "bleu": round(metrics.bleu(res["hyp"], res["tgt"]), 2),
                          "chrf": round(metrics.chrf(res["hyp"], res["tgt"]), 2)}))
        return 0
    from .train.run import run_training

    res = run_training(cfg)
    print(_summary(res))
    return 0


def _summary(res: dict) -> str:
    from .tracking import redact

    lines = ["", "== done ==", f"MLflow run:   {res['run_id']} (experiment '{res['experiment']}', run name {res['run_name']})",
             f"tracking URI: {redact(res['tracking_uri'])}"]
    for k in ("test_bleu", "test_chrf"):
        if k in res:
            lines.append(f"{k}:    {res[k]:.2f}")
    lines.append(f"best model:   {res['best_dir']}")
    if res.get("model_uri"):
        lines.append(f"MLflow model: {res['model_uri']}")
    lines.append(f"look at it:   mlflow ui --backend-store-uri {redact(res['tracking_uri'])}   "
                 f"(then open http://127.0.0.1:5000)")
    lines.append(f"translate:    echo 'a sentence' | pipeline translate --model {res['best_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
