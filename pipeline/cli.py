"""Command line: parse, load the config, dispatch. No logic lives here.

pipeline demo                       train on the embedded demo corpus (a few minutes)
pipeline train [key=value ...]      preprocess if needed, train, test, log to MLflow
pipeline preprocess [key=value ...] only the Ray Data preprocessing
pipeline config [key=value ...]     print the resolved config
pipeline doctor [key=value ...]     preflight checks for a run with that config
pipeline tune [key=value ...]       a Ray Tune sweep of Ray Train runs
pipeline report --sweep NAME        a sweep's plots and summary from MLflow
pipeline promote NAME VERSION       move a registered model's champion alias by hand
pipeline translate --model M        stdin -> stdout
pipeline caption --model M CLIP...  captions of video clips
pipeline evaluate --model M [...]   BLEU and chrF on a split
pipeline submit [--address URL] -- train ...   run a command as a job on a Ray cluster
pipeline jobs status|logs|stop ID   follow a submitted job
pipeline download multi30k DIR      fetch the public Multi30k files
pipeline tracking replay PATH       send MLflow records kept while the server was away
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import compose

EXAMPLES = """overrides: group=option (data=multi30k) or group.key=value (model.hidden_size=512);
`pipeline config` lists every key. Examples:
  pipeline train data=multi30k data.root=DIR train.max_minutes=12
  pipeline train train=gpu model=large data=multi30k data.root=DIR
"""

DEMO_OVERRIDES = ["data=demo_text", "model=small", "train=demo"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline",
        description="LSTM encoder-decoder training on Ray, tracked in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(
            name, help=help, description=help, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        return c

    for name, help in (
        ("demo", "train end to end on the embedded demo corpus (data=demo_text, a few minutes on a CPU)"),
        ("train", "preprocess (if needed), train on Ray Train, test, and log everything to MLflow"),
        ("preprocess", "run the Ray Data preprocessing only and print the manifest"),
        ("tune", "a Ray Tune sweep: each trial a Ray Train run, MLflow parent + child runs"),
        ("config", "print the resolved config as YAML"),
        ("doctor", "preflight: data readable, storage writable, MLflow and Ray reachable, resources"),
    ):
        c = cmd(name, help)
        c.add_argument("overrides", nargs="*", help="config overrides: key=value")
        if name == "preprocess":
            c.add_argument("--force", action="store_true", help="redo it even if a matching output exists")
        if name in ("demo", "train", "preprocess", "tune"):
            c.add_argument(
                "--verbose", action="store_true", help="show Ray's own output live (by default: in the run's log file)"
            )
    c = cmd("translate", "translate lines from stdin to stdout")
    c.add_argument(
        "--model",
        required=True,
        help="model bundle folder (e.g. ray_results/RUN/best) or MLflow model URI (runs:/ID/model, models:/NAME@champion)",
    )
    c.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    c.add_argument("--length-penalty", type=float, default=0.6)
    c.add_argument("--batch-size", type=int, default=64)
    c = cmd("caption", "caption video clips (mp4, ... or .npy features) with a trained captioning model")
    c.add_argument("clips", nargs="+", help="video files (local paths or URIs), or .npy feature files")
    c.add_argument("--model", required=True, help="model bundle folder (ray_results/RUN/best) or MLflow model URI")
    c.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    c.add_argument("--length-penalty", type=float, default=0.6)
    c.add_argument("--backbone", default="", help="the TorchScript backbone, for a model trained on frozen features")
    c = cmd("evaluate", "BLEU and chrF (text) or CIDEr-D, BLEU-4, ROUGE-L (video) of a model on a split of a corpus")
    c.add_argument("--model", required=True, help="model bundle folder or MLflow model URI")
    c.add_argument("--split", default="test", choices=["train", "val", "test"])
    c.add_argument("--beam", type=int, default=4)
    c.add_argument("--length-penalty", type=float, default=0.6)
    c.add_argument("overrides", nargs="*", help="config overrides: key=value")
    c = cmd("report", "write a sweep's review (PNG plots + Markdown summary) from MLflow")
    c.add_argument("--sweep", required=True, help="the sweep's name (tune.name, printed by pipeline tune)")
    c.add_argument("--out", default=None, help="output folder (default: reports/SWEEP)")
    c.add_argument("overrides", nargs="*", help="tracking overrides, e.g. tracking.experiment=NAME")
    c = cmd("promote", "move the alias champion of a registered model to VERSION by hand, tagging who and why")
    c.add_argument("name", help="the registered model (tune.register_as)")
    c.add_argument("version", help="the version to make champion")
    c.add_argument("--reason", default="promoted by hand", help="why; kept as the version's promotion_reason tag")
    c.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    c = cmd("submit", "submit a pipeline command to a Ray cluster as a Ray job: pipeline submit -- train ...")
    c.add_argument("--address", default=None, help="the cluster's dashboard/jobs URL (default: RAY_ADDRESS)")
    c.add_argument(
        "--wait",
        dest="wait",
        action="store_true",
        default=True,
        help="stream the logs and exit with the job's outcome (default)",
    )
    c.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")
    c.add_argument("job", nargs=argparse.REMAINDER, help="-- then the pipeline command and its overrides")
    c = cmd("jobs", "status, logs or stop of a submitted job")
    c.add_argument("action", choices=["status", "logs", "stop"])
    c.add_argument("job_id")
    c.add_argument("--address", default=None, help="default: RAY_ADDRESS")
    c = cmd("tracking", "MLflow records a run kept while the tracking server was away")
    c.add_argument("action", choices=["replay"])
    c.add_argument(
        "path",
        help="a spill folder (TRAIN.STORAGE_PATH/RUN/mlflow-unsent, printed by the run) or one .jsonl file in it",
    )
    c.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else the URI in the file")
    c = cmd("download", "download a public corpus (needs internet)")
    c.add_argument("corpus", choices=["multi30k"])
    c.add_argument("dest", help="destination folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .cluster import sigterm_as_ctrl_c

    before = sigterm_as_ctrl_c()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        from .redaction import redact

        print(f"error: {redact(str(cause))}", file=sys.stderr)  # messages quote config values
        return 2
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


OUR_ERRORS = {
    "pipeline.config": "ConfigError",
    "pipeline.data.readers": "DataError",
    "pipeline.tracking": "TrackingError",
    "pipeline.cluster": "ClusterError",
    "pipeline.inference": "BundleError",
    "pipeline.lock": "LockError",
}


def _user_error(e: BaseException) -> BaseException | None:
    """The error to print as one line, or None to keep the traceback. One line only for what
    our code raised with its context (the key, the path, the step): our error classes, and
    OSErrors that our code raised with a message of its own. An OSError from the system or a
    library (``os.getcwd()`` inside fsspec in a deleted folder: "[Errno 2] No such file or
    directory", naming nothing) keeps its traceback, which says where it came from."""
    # Only modules already imported: an error class of one that is not cannot have been
    # raised, and importing torch (pipeline.inference) in a deleted folder aborts the process.
    ours = tuple(getattr(sys.modules[m], name) for m, name in OUR_ERRORS.items() if m in sys.modules)
    seen = set()
    while e is not None and id(e) not in seen:  # Ray wraps worker errors; find ours inside
        seen.add(id(e))
        if isinstance(e, ours) or (isinstance(e, OSError) and _raised_by_us(e)):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _raised_by_us(e: OSError) -> bool:
    """``raise FileNotFoundError("no sweep named ...")`` in pipeline/: no errno (the OS sets
    one on its own errors) and the innermost frame is ours."""
    tb = e.__traceback__
    if e.errno is not None or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def _dispatch(args: argparse.Namespace) -> int:
    from .cluster import prepare_job

    if not hasattr(args, "overrides"):  # the commands with a config check after composing it
        prepare_job()
    if args.command == "download":
        from .data.download import download_multi30k

        download_multi30k(args.dest)
        return 0
    if args.command == "tracking":
        from .tracking import replay

        sent, left = replay(args.path, args.tracking_uri)
        print(f"sent {sent} record(s)" + (f"; {left} left (MLflow did not answer), run it again" if left else ""))
        return 0 if not left else 1
    if args.command == "submit":
        from .cluster import submit

        job = args.job[1:] if args.job[:1] == ["--"] else args.job
        return submit(job, args.address, args.wait)
    if args.command == "jobs":
        from .cluster import jobs

        return jobs(args.action, args.job_id, args.address)
    if args.command == "promote":
        import getpass

        from .config import TrackingConfig
        from .tracking import promote, resolve

        uri, _ = resolve(TrackingConfig(tracking_uri=args.tracking_uri or ""))
        before = promote(uri, args.name, args.version, args.reason, getpass.getuser())
        print(
            f"champion of {args.name}: v{before} -> v{args.version}"
            if before
            else f"champion of {args.name}: v{args.version} (there was none)"
        )
        return 0
    if args.command == "translate":
        from .inference import Translator

        tr = Translator.load(args.model)
        for chunk in _chunks(sys.stdin, args.batch_size * 4):
            for out in tr.translate(chunk, args.beam, args.length_penalty, args.batch_size):
                print(out)
            sys.stdout.flush()
        return 0
    if args.command == "caption":
        from .inference import Captioner

        cap = Captioner.load(args.model)
        for path, text in zip(
            args.clips, cap.caption(cap.load_clips(args.clips, args.backbone), args.beam, args.length_penalty)
        ):
            print(f"{path}\t{text}")
        return 0
    from . import console

    console.set_verbose(getattr(args, "verbose", False))
    overrides = list(args.overrides)
    if args.command == "demo":
        overrides = DEMO_OVERRIDES + overrides
    cfg, composition = compose(overrides)
    # In a submitted job: durable paths (report's --out among them), the credentials named.
    outputs = {"report --out": args.out or f"reports/{args.sweep}"} if args.command == "report" else {}
    outputs = prepare_job(cfg, outputs)
    if args.command == "config":
        print(f"# options: {composition.summary()}\n{cfg.redacted_yaml()}", end="")
        return 0
    if args.command == "doctor":
        from .doctor import doctor

        return 0 if doctor(cfg) else 1
    if args.command == "preprocess":
        from .cluster import init_ray
        from .data.readers import check_before_ray
        from .tasks import preprocess
        from .tracking import redact

        check_before_ray(cfg.data)
        with console.capture(console.log_file(cfg.data.output_dir)):
            init_ray()
            out, manifest = preprocess(cfg.data, force=args.force)
        print(
            json.dumps(
                {"output": redact(out), **{k: manifest[k] for k in ("rows_read", "rows_kept", "dropped", "splits")}},
                indent=2,
            )
        )
        return 0
    if args.command == "evaluate":
        from .cluster import init_ray
        from .data.readers import check_before_ray
        from .evaluation import decode_split
        from .tasks import task_for

        check_before_ray(cfg.data)
        init_ray()
        task = task_for(cfg)
        out, manifest = task.preprocess(cfg.data)
        res = decode_split(task, args.model, f"{out}/{args.split}", args.beam, args.length_penalty)
        scores = task.scores(res["hyp"], res["tgt"], final=True)
        counts = {"split": args.split, task.unit: len(res["hyp"])}
        print(json.dumps({**counts, **{k: round(v, task.digits) for k, v in scores.items()}}))
        return 0
    if args.command == "report":
        from .report import write_report
        from .tracking import resolve

        uri, experiment = resolve(cfg.tracking)
        for path in write_report(uri, experiment, args.sweep, outputs["report --out"]):
            print(path)
        return 0
    if args.command == "tune":
        from .tasks import task_for
        from .tune import format_table, run_sweep

        res = run_sweep(cfg)
        metric = cfg.tune.metric or task_for(cfg).metric
        print(f"\n== sweep {res['sweep']} ==\n{format_table(res['trials'], metric)}")
        if res.get("registered_model"):
            tests = " ".join(f"{k} {v:.3f}" for k, v in res.items() if k.startswith("test_") and isinstance(v, float))
            print(
                f"challenger: {res['best']['run_name']} -> models:/{res['registered_model']}@challenger "
                f"(version {res['registered_version']}); {tests}"
            )
            print(res["promotion"])
            print(
                f"serve it:   mlflow models serve -m models:/{res['registered_model']}@champion --env-manager local "
                "--host 127.0.0.1 --port 5001"
            )
        print(f"review: pipeline report --sweep {res['sweep']}")
        return 0
    from .train.run import run_training

    res = run_training(cfg)
    print(_summary(res))
    return 0


def _chunks(lines, size: int):
    """stdin in lists of ``size`` lines, as they arrive: a large file is never read whole,
    and a pipe gets its translations chunk by chunk."""
    chunk: list[str] = []
    for line in lines:
        chunk.append(line.rstrip("\n"))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _summary(res: dict) -> str:
    from .tracking import redact

    lines = [
        "",
        "== done ==",
        f"MLflow run:   {res['run_id']} (experiment '{res['experiment']}', run name {res['run_name']})",
        f"tracking URI: {redact(res['tracking_uri'])}",
    ]
    for k, v in res.items():
        if k.startswith("test_") and isinstance(v, float):
            lines.append(f"{k + ':':<13} {v:.3f}")
    best = redact(res["best_dir"])
    lines.append(f"best model:   {best}")
    if res.get("model_uri"):
        lines.append(f"MLflow model: {res['model_uri']}")
    lines.append(
        f"look at it:   mlflow ui --backend-store-uri {redact(res['tracking_uri'])}   (then open http://127.0.0.1:5000)"
    )
    from .tasks import TASKS

    lines.append(f"use it:       {TASKS[res['task']]().usage(best)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
