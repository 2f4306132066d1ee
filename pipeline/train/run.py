"""The training driver: preprocess, open the MLflow run, fit a TorchTrainer, test, log.

``RAY_ADDRESS`` set = join that cluster; otherwise start a local Ray. Running again
with the same ``train.run_name`` resumes: the workers get the newest checkpoint (from Ray
Train's record, or by listing the run's folder when the driver died before Ray recorded it)
and the MLflow run with that name is reopened.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import ray

from .. import console, tracking
from ..cluster import check_fits, check_multi_node, init_ray, resolve_worker_cpus, storage_uri
from ..config import Config, ConfigError
from ..data.output import read_split, read_tokenizers
from ..data.readers import check_before_ray
from ..data.tokenizer import Vocab
from ..evaluation import local_copy, test_and_log
from ..lock import hold_named
from ..tasks import task_for


def rows_per_block(rows: int, workers: int) -> int:
    """Rows per Ray Data block for a split: about 8 blocks per worker, 64 to 8192 rows.

    ``streaming_split`` hands out whole blocks, and a Parquet file is read as one block: a
    split written as one file (any small corpus) would go whole to one worker while the
    others trained on nothing. A streaming repartition to this size gives every worker its
    share. Rows are the task's rows (:meth:`Task.split_rows`)."""
    return int(min(8192, max(64, rows // (8 * max(1, workers)))))


def _exactly_once_data_config():
    from ray.train import DataConfig

    class ExactlyOnce(DataConfig):
        """Ray Train's default split (equal=True) may drop up to world_size-1 rows an
        epoch; the loop already copes with unequal shards, so split without dropping."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = split
            return out

    return ExactlyOnce()


def split_dataset(data_dir: str, split: str, rows: int, t: Any) -> ray.data.Dataset:
    """A preprocessed split for Ray Train, in blocks every worker gets a share of. One of at
    most ``train.in_memory_mb`` MiB on storage is read now, by this process, and put into the
    object store (owned by this driver, on its node): each epoch and validation would
    otherwise start a fresh read of storage, and a Ray Data read of a split of a few MiB
    costs seconds of task start-up (bench/split_read.py). The blocks' row counts and schema are
    taken here (``from_blocks``): ``from_arrow`` asks a whole-CPU task per block for them, which
    costs a worker's start the first time and waits while training workers hold the CPUs (a
    sweep's next trial). A larger split is a lazy read whose tasks take a quarter CPU: the
    workers hold whole CPUs, and a sweep's trial driver a sliver more, so whole-CPU read tasks
    could wait forever on a small cluster."""
    path = f"{data_dir}/{split}"
    per_block = rows_per_block(rows, t.num_workers)
    if t.in_memory_mb > 0:
        fs, root = fsspec.core.url_to_fs(path)
        if fs.du(root) / 2**20 <= t.in_memory_mb:
            table = read_split(path)
            return ray.data.from_blocks(
                [table.slice(o, per_block) for o in range(0, max(table.num_rows, 1), per_block)]
            )
    return ray.data.read_parquet(path, num_cpus=0.25).repartition(target_num_rows_per_block=per_block)


@dataclass
class Prepared:
    """What a run (and every trial of a sweep) starts from: where MLflow and the Ray storage
    are, and the preprocessed data with its tokenizers and vocabulary."""

    uri: str
    experiment: str
    storage: str
    data_dir: str
    manifest: dict[str, Any]
    src_json: str
    tgt_json: str
    vocab: Vocab
    # MLflow's context tags of the process that started the run or sweep (tracking.context_tags);
    # None: those of the process that opens the run.
    context: dict[str, str] | None = None
    target_tokens: int = 0  # of the training split (train.batch_tokens=0 sizes batches from it)

    @property
    def train_pairs(self) -> int:
        """Training examples: sentence pairs, or (clip, caption) pairs (train.max_epochs=0)."""
        return self.manifest["splits"]["train"]["kept"]


def prepare(cfg: Config, sweep: bool = False) -> Prepared:
    """Checks and preprocessing shared by a training run and every trial of a sweep."""
    t = cfg.train
    uri, experiment = tracking.resolve(cfg.tracking)
    tracking.check_reachable(uri)
    storage = storage_uri(t.storage_path)
    check_before_ray(cfg.data)
    init_ray(t.num_workers * resolve_worker_cpus(t, sweep))
    check_fits(t)  # before preprocessing: minutes of it would be wasted
    check_multi_node(storage, cfg.data.output_dir, uri)
    task = task_for(cfg)
    data_dir, manifest = task.preprocess(cfg.data)
    src_json, tgt_json = read_tokenizers(data_dir)
    vocab = Vocab.of(manifest, **task.model_input(manifest))
    prep = Prepared(
        uri, experiment, storage, data_dir, manifest, src_json, tgt_json, vocab, tracking.context_tags(),
        task.target_tokens(data_dir),
    )  # fmt: skip
    resolve_from_corpus(t, prep.target_tokens, prep.train_pairs)  # here for the sweep's scheduler, again per run
    return prep


AUTO_STEPS_PER_EPOCH = 33  # train.batch_tokens=0: an epoch is this many full batches (more with padding)...
AUTO_BATCH_TOKENS = (200, 1500)  # ...within these bounds (1500: the default, tuned on the demo text)
AUTO_EXAMPLES = 360_000  # train.max_epochs=0: epochs to train on this many examples...
AUTO_EPOCHS = (20, 300)  # ...within these bounds


def resolve_from_corpus(t: Any, target_tokens: int, train_pairs: int) -> None:
    """Set the training keys that are 0 (auto) from the size of the training split.

    ``train.batch_tokens``: an epoch is ``AUTO_STEPS_PER_EPOCH`` full batches at
    ``num_workers`` workers (a small corpus gets small batches, and steps enough to learn
    in; a large one the default 1500), so the warmup (in steps) means the same number of
    epochs on 600 clips as on 6,000. ``train.max_epochs``: epochs enough to train on
    ``AUTO_EXAMPLES`` examples (a small corpus is read more often). The video recipe asks
    for both; they were set so that the demo's 1,200 clips (6,000 captions, 52,800 target
    tokens) get what it was tuned with: 800 tokens and 60 epochs."""
    if not t.max_epochs:
        lo, hi = AUTO_EPOCHS
        t.max_epochs = int(min(hi, max(lo, round(AUTO_EXAMPLES / max(train_pairs, 1)))))
        print(
            f"[train] train.max_epochs=0 (from the corpus): {t.max_epochs}, for {train_pairs:,} training "
            f"examples: {AUTO_EXAMPLES:,} examples seen in all",
            flush=True,
        )
    if not t.batch_tokens:
        micro_batches = t.num_workers * t.accumulate  # per step
        lo, hi = AUTO_BATCH_TOKENS
        t.batch_tokens = int(min(hi, max(lo, round(target_tokens / (micro_batches * AUTO_STEPS_PER_EPOCH) / 50) * 50)))
        steps = target_tokens / (micro_batches * t.batch_tokens)
        print(
            f"[train] train.batch_tokens=0 (from the corpus): {t.batch_tokens}, for {target_tokens:,} target "
            f"tokens in the training split: {steps:.0f} full batches per epoch at {t.num_workers} workers",
            flush=True,
        )


# Training keys that change what a run learns. The others (budgets, workers and resources,
# evaluation cadence and beams, storage, logging) may change when a run is resumed.
RESULT_KEYS = (
    "seed",
    "batch_tokens",
    "sort_window",
    "lr",
    "weight_decay",
    "warmup_steps",
    "clip_norm",
    "accumulate",
    "label_smoothing",
    "amp_dtype",
    "grad_compression",
)
FINGERPRINT_FILE = "run_fingerprint.json"


def run_fingerprint(cfg: Config, prep: Prepared) -> dict[str, str]:
    """What defines a run: the preprocessed data (its folder name hashes the data config and
    the input files), both tokenizers, every model key and the training keys that change the
    result. A run_name resumes only where this is unchanged."""
    tok = prep.manifest["tokenizer"]
    out = {
        "data": os.path.basename(prep.data_dir.rstrip("/")),
        "data.src_tokenizer": tok["src_sha256"],
        "data.tgt_tokenizer": tok["tgt_sha256"],
    }
    out.update({k: str(v) for k, v in cfg.flat(("model",)).items()})
    out.update({f"train.{k}": str(getattr(cfg.train, k)) for k in RESULT_KEYS})
    return out


def fingerprint_diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return [
        f"{k}: {old.get(k, '(unset)')} != {new.get(k, '(unset)')}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def check_fingerprint(folder: str, fingerprint: dict[str, str], what: str) -> None:
    """Record ``fingerprint`` in ``folder`` on a first run; on a rerun refuse, before any
    training or logging, one that differs, listing every difference."""
    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root}/{FINGERPRINT_FILE}"
    if fs.exists(path):
        with fs.open(path, "r") as f:
            old = json.load(f)
        diff = fingerprint_diff(old, fingerprint)
        if diff:
            raise ConfigError(
                f"{what} exists with other data or config, so it cannot resume:\n  "
                + "\n  ".join(diff)
                + f"\nStart anew with another name, or delete {tracking.redact(folder)} to discard the old run."
            )
        return
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{path}.tmp", "w") as f:
        json.dump(fingerprint, f, indent=1, sort_keys=True)
    fs.mv(f"{path}.tmp", path)


def min_workers(t: Any) -> int:
    """The fewest workers a run goes on with (``train.min_workers``; 0 = a fixed size)."""
    return t.min_workers or t.num_workers


def scaling_config(t: Any) -> Any:
    """Ray Train's ScalingConfig: a fixed group, or an elastic one of (min, max) workers that
    Ray restarts at another size (from the latest checkpoint) when nodes go or come."""
    from ray.train import ScalingConfig

    low = min_workers(t)
    return ScalingConfig(
        num_workers=t.num_workers if low == t.num_workers else (low, t.num_workers),
        elastic_resize_monitor_interval_s=t.resize_interval_s,
        use_gpu=t.use_gpu,
        placement_strategy=t.placement_strategy,
        resources_per_worker={"CPU": resolve_worker_cpus(t), **({"GPU": t.gpus_per_worker} if t.use_gpu else {})},
    )


def run_training(cfg: Config) -> dict[str, Any]:
    run_name = cfg.train.run_name or f"{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # From before Ray starts: its start-up lines go to the run's log too.
    with console.capture(console.log_file(f"{cfg.train.storage_path}/{run_name}")):
        prep = prepare(cfg)
        return fit_run(cfg, prep, run_name)


def fit_run(
    cfg: Config,
    prep: Prepared,
    run_name: str,
    parent_run_id: str | None = None,
    in_tune: bool = False,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One MLflow run + one TorchTrainer fit. A sweep's trial passes its parent run, ``in_tune``
    (metrics go to Tune too; the test split is left to the sweep's champion) and the tags of
    its searched keys (``tags``, set on a new run)."""
    t = cfg.train
    t.run_name = run_name
    resolve_from_corpus(t, prep.target_tokens, prep.train_pairs)  # per run: a trial may search num_workers
    run_dir = f"{prep.storage}/{run_name}"
    # A sweep holds its own lock; Tune may restart a trial while the old one winds down.
    lock = None if in_tune else hold_named(run_dir, "train.run_name", run_name, "pipeline train")
    try:
        return _fit_run(cfg, prep, run_name, run_dir, parent_run_id, in_tune, tags or {})
    finally:
        if lock is not None:
            lock.release()


def _fit_run(
    cfg: Config,
    prep: Prepared,
    run_name: str,
    run_dir: str,
    parent_run_id: str | None,
    in_tune: bool,
    extra_tags: dict[str, str],
) -> dict[str, Any]:
    t, task = cfg.train, task_for(cfg)
    uri, experiment, data_dir, manifest = prep.uri, prep.experiment, prep.data_dir, prep.manifest
    fingerprint = run_fingerprint(cfg, prep)
    check_fingerprint(run_dir, fingerprint, f"train.run_name '{run_name}' ({tracking.redact(run_dir)})")
    tags = {"ray.run_name": run_name, "pipeline.data_dir": tracking.redact(data_dir), **extra_tags}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id, resumed = tracking.open_run(uri, experiment, run_name, cfg.redacted_flat(), tags, prep.context)
    print(
        f"[train] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment '{experiment}' at "
        f"{tracking.redact(uri)}",
        flush=True,
    )
    # The driver's logging is buffered like rank 0's: a server away at the end of a run that
    # trained well costs a spill file to replay, not the run.
    spill = tracking.spill_dir(prep.storage, run_name)
    log = tracking.RunLogger(uri, run_id, spill, who="driver")
    if not resumed:
        log.log_text(cfg.redacted_yaml(), "config.yaml")
        with tempfile.TemporaryDirectory(prefix="pipeline-data-") as tmp:  # the logger keeps its own copies
            for name in ("manifest.json", "src_tokenizer.json", "tgt_tokenizer.json"):
                log.log_artifact(local_copy(f"{data_dir}/{name}", tmp), "data")
        log.log_metrics(task.data_metrics(manifest), 0)
        log.log_inputs(tracking.split_datasets(data_dir, manifest))  # the Datasets column: train, val, test
        log.flush()
    best_dir = f"{prep.storage}/{run_name}/best"

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from .loop import LoopConfig, latest_checkpoint, train_loop

    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(  # a plain dict to the workers
            LoopConfig(
                config=cfg.to_dict(),
                vocab=prep.vocab.to_dict(),
                mlflow_run_id=run_id,
                tracking_uri=uri,
                src_tokenizer=prep.src_json,
                tgt_tokenizer=prep.tgt_json,
                best_dir=best_dir,
                tracking_spill_dir=spill,
                latest_checkpoint=latest_checkpoint(run_dir),
                fingerprint=fingerprint,
            )
        ),
        scaling_config=scaling_config(t),
        run_config=RunConfig(
            name=run_name,
            storage_path=prep.storage,
            callbacks=callbacks,
            failure_config=FailureConfig(
                max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={s: split_dataset(data_dir, s, task.split_rows(manifest["splits"][s]), t) for s in ("train", "val")},
        dataset_config=_exactly_once_data_config(),
    )
    t0 = time.time()
    try:
        with SigintRestored():
            trainer.fit()
        results = _test_finished(cfg, prep, log, run_id, run_name, best_dir, in_tune, t0)
    except BaseException as e:
        # Ctrl-C: Ray Train's handler aborts the workers and fit() leaves with SystemExit (in
        # the main thread, the only place that handler is installed); later, KeyboardInterrupt.
        interrupted = isinstance(e, KeyboardInterrupt) or (
            isinstance(e, SystemExit) and threading.current_thread() is threading.main_thread()
        )
        # A trial that Tune stops (ASHA) lands here too: the sweep driver, which knows
        # stopped from failed, closes its run; a plain run failed, or was stopped by its user.
        if not in_tune:
            log.end_run("KILLED" if interrupted else "FAILED")
        try:
            close_logger(log)
        except Exception as e2:
            print(f"[tracking] closing the MLflow run failed too: {e2}", flush=True)
        if interrupted and not in_tune:
            newest = latest_checkpoint(run_dir)
            print(
                "[train] interrupted: the MLflow run is KILLED; "
                + (f"the newest checkpoint is at step {newest[0]}" if newest else "no checkpoint was written yet")
                + f"; to go on, run the same command with train.run_name={run_name}",
                flush=True,
            )
            raise KeyboardInterrupt from None
        raise
    log.end_run("FINISHED")
    results["unsent_records"] = close_logger(log)
    return results


def _test_finished(
    cfg: Config,
    prep: Prepared,
    log: tracking.RunLogger,
    run_id: str,
    run_name: str,
    best_dir: str,
    in_tune: bool,
    t0: float,
) -> dict[str, Any]:
    """After a fit: the run's figures, and the best model tested on the test split and logged
    (not in a sweep's trial, nor again when nothing was trained since the last test)."""
    from .loop import latest_checkpoint

    uri, data_dir, manifest = prep.uri, prep.data_dir, prep.manifest
    results: dict[str, Any] = {
        "run_id": run_id,
        "run_name": run_name,
        "tracking_uri": uri,
        "experiment": prep.experiment,
        "best_dir": best_dir,
        "data_dir": data_dir,
        "train_seconds": round(time.time() - t0, 1),
        "task": task_for(cfg).name,
    }
    fs, best_root = fsspec.core.url_to_fs(best_dir)
    final = latest_checkpoint(f"{prep.storage}/{run_name}")
    tested = _tested_at(uri, run_id)
    if not in_tune and fs.exists(f"{best_root}/model.pt"):
        if final and tested == str(final[0]):
            print(f"[test] already tested at step {final[0]}: nothing was trained since", flush=True)
        else:
            results.update(test_and_log(cfg, log, best_dir, data_dir, manifest, final[0] if final else 0))
            if final:
                log.set_tags({TESTED_TAG: str(final[0])})
    return results


class SigintRestored:
    """Ray Train's ``fit()`` and Tune's ``Tuner.fit()``, called in the main thread, install a
    SIGINT handler and leave it there when they return. Ray Train's holds the controller's
    handle, so the controller, its DatasetManager and split coordinators (about 1 GB here)
    stayed alive while this driver tested and logged the model, and a Ctrl-C in that phase
    asked a finished controller to abort instead of stopping the program. On leaving, the
    handler from before comes back; ``caught`` says whether a Ctrl-C came and the library's
    handler put it back itself (Tune's does, then returns as if done)."""

    def __init__(self) -> None:
        self.main = threading.current_thread() is threading.main_thread()
        self.before = signal.getsignal(signal.SIGINT) if self.main else None
        self.caught = False

    def __enter__(self) -> SigintRestored:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.main and self.before is not None:
            self.caught = signal.getsignal(signal.SIGINT) is self.before
            signal.signal(signal.SIGINT, self.before)


TESTED_TAG = "pipeline.tested_at_step"  # a rerun that trained nothing does not log its test again


def _tested_at(uri: str, run_id: str) -> str | None:
    try:
        return tracking.client(uri).get_run(run_id).data.tags.get(TESTED_TAG)
    except Exception as e:
        if not tracking.is_outage(e):
            raise
        return None


def close_logger(log: tracking.RunLogger) -> int:
    """Close a run's logger; say where its unsent records are, if the server is still away."""
    left = log.close(wait_s=30.0)
    if left:
        print(log.unsent_message(left), flush=True)
    return left
