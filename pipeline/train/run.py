"""The training driver: preprocess, open the MLflow run, fit a TorchTrainer, test, log.

``RAY_ADDRESS`` set = join that cluster; otherwise start a local Ray. Running again
with the same ``train.run_name`` resumes: the workers get the newest checkpoint (from Ray
Train's record, or by listing the run's folder when the driver died before Ray recorded it)
and the MLflow run with that name is reopened.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import ray

from .. import metrics, tracking
from ..cluster import check_fits, check_multi_node
from ..config import Config, ConfigError, is_video
from ..data.preprocess import preprocess, read_tokenizers
from ..data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from ..inference import BUNDLE_FILES, Captioner, Translator
from ..lock import hold_named


def init_ray(min_cpus: int = 1) -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray (once per process).

    The local Ray is for this machine only: every Ray process listens on 127.0.0.1, and
    token authentication is on (the token is ``~/.ray/auth_token``, made on first use and
    never printed)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        with _loopback_node(_loopback_only(address)):
            ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs above the training workers' share leave room for Ray Data's tasks
        # (whole-CPU file listing) and a sweep's trial drivers; without them, workers
        # holding every CPU would starve their own input. Never more than the cores + 2:
        # a request for more workers than this machine can run is refused (check_fits),
        # not granted as an oversubscribed local cluster.
        cores = os.cpu_count() or 1
        _start_local_ray(max(cores, min(min_cpus, cores) + 2))
    ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def _loopback_node(on: bool) -> Iterator[None]:
    """Ray's single-node mode while ``ray.init`` runs (see _start_local_ray): the node's
    address stays 127.0.0.1 instead of being turned into the machine's routable one."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    if on:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _loopback_only(address: str) -> bool:
    """A RAY_ADDRESS on loopback whose GCS answers there but not on the machine's routable
    address: a local Ray that pipeline started (bound to 127.0.0.1). Ray would rewrite the
    address to the routable one and never reach it. A cluster from ``ray start`` listens on
    every interface and is joined as Ray does by default."""
    import socket

    from ray._private.services import node_ip_address_from_perspective

    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        return False

    def answers(ip: str) -> bool:
        try:
            with socket.create_connection((ip, int(port)), timeout=1):
                return True
        except OSError:
            return False

    return answers("127.0.0.1") and not answers(node_ip_address_from_perspective())


def _start_local_ray(num_cpus: int) -> None:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from ..cluster import ClusterError

    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode and mode.lower() != "token":
        raise ClusterError(
            f"RAY_AUTH_MODE={mode}: pipeline starts its local Ray with token authentication only; "
            "unset RAY_AUTH_MODE (or set it to token)"
        )
    # Ray 2.60's ray.init turns a loopback _node_ip_address into the machine's routable
    # address (services.resolve_ip_for_localhost), and the GCS, raylet, object manager,
    # workers and agents then listen on all interfaces. With "clusters" off, the mode Ray
    # itself uses on macOS and Windows, the node address stays 127.0.0.1 and every process
    # binds there. Off only while this node starts: ray.init reads it, nothing after does.
    with _loopback_node(True):
        # The dashboard serves Ray's state API, which Ray Train's cleanup polls; 127.0.0.1 only.
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", log_to_driver=True)
    if not is_token_auth_enabled():  # Ray turns it on for a new local cluster; make sure it did
        ray.shutdown()
        raise ClusterError("the local Ray started without token authentication; set RAY_AUTH_MODE=token")


def storage_uri(path: str) -> str:
    """Ray needs an absolute local path or a URI; check it can be written now, not later."""
    uri = path if "://" in path else str(Path(path).expanduser().resolve())
    fs, root = fsspec.core.url_to_fs(uri)
    probe = f"{root}/.write-probe-{os.getpid()}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        raise PermissionError(f"train.storage_path '{path}' cannot be written: {e}") from e
    return uri


def rows_per_block(split: dict[str, Any], workers: int) -> int:
    """Rows per Ray Data block for a split: about 8 blocks per worker, 64 to 8192 rows.

    ``streaming_split`` hands out whole blocks, and a Parquet file is read as one block: a
    split written as one file (any small corpus) would go whole to one worker while the
    others trained on nothing. A streaming repartition to this size gives every worker its
    share. Rows are sentence pairs, or videos with all their captions."""
    rows = split.get("videos", split["kept"])
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


class _TranslateBatch:
    """Ray Data actor: translate the ``src`` text column with a model bundle (its own
    tokenizer, so any model can be scored on any preprocessed split)."""

    def __init__(self, bundle: str, beam_size: int, length_penalty: float):
        import torch

        self.tr = Translator.load(bundle, "cuda" if torch.cuda.is_available() else "cpu")
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hyps = self.tr.translate(list(batch["src"]), self.beam_size, self.length_penalty)
        return {"id": batch["id"], "src": batch["src"], "tgt": batch["tgt"], "hyp": np.array(hyps, dtype=object)}


class _CaptionBatch:
    """Ray Data actor: caption stored clips (frames or features) with a video bundle."""

    def __init__(self, bundle: str, beam_size: int, length_penalty: float):
        import torch

        self.cap = Captioner.load(bundle, "cuda" if torch.cuda.is_available() else "cpu")
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data.video import clip_array

        clips = [clip_array(d, s, t) for d, s, t in zip(batch["data"], batch["shape"], batch["dtype"])]
        hyps = self.cap.caption(clips, self.beam_size, self.length_penalty)
        refs = [json.dumps([str(c) for c in caps]) for caps in batch["captions"]]  # a string column, not ragged lists
        return {
            "id": batch["id"],
            "src": batch["video_id"],
            "tgt": np.array(refs, dtype=object),
            "hyp": np.array(hyps, dtype=object),
        }


def translate_split(
    bundle: str, split_dir: str, beam_size: int, length_penalty: float, video: bool = False
) -> dict[str, list]:
    """Translate (or caption) a preprocessed split on an actor pool; rows come back in id
    order. Video: ``src`` is the video id and ``tgt`` the list of its reference captions."""
    n = max(1, min(4, int(ray.available_resources().get("CPU", 1))))
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    columns, actor = (
        (["id", "video_id", "data", "shape", "dtype", "captions"], _CaptionBatch)
        if video
        else (["id", "src", "tgt"], _TranslateBatch)
    )
    ds = (
        ray.data.read_parquet(split_dir)
        .select_columns(columns)
        .map_batches(
            actor,
            fn_constructor_args=(bundle, beam_size, length_penalty),
            batch_size=64 if video else 256,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n),
            num_gpus=1 if use_gpu else 0,
            batch_format="numpy",
        )
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    out = {k: [r[k] for r in rows] for k in ("src", "tgt", "hyp")}
    if video:
        out["tgt"] = [json.loads(refs) for refs in out["tgt"]]
    return out


def prepare(cfg: Config) -> dict[str, Any]:
    """Checks and preprocessing shared by a training run and every trial of a sweep."""
    t = cfg.train
    uri, experiment = tracking.resolve(cfg.tracking)
    tracking.check_reachable(uri)
    storage = storage_uri(t.storage_path)
    init_ray(t.num_workers * t.cpus_per_worker)
    check_fits(t)  # before preprocessing: minutes of it would be wasted
    check_multi_node(storage, cfg.data.output_dir, uri)
    data_dir, manifest = preprocess(cfg.data)
    src_json, tgt_json = read_tokenizers(data_dir)
    vocab = {k: manifest["tokenizer"][k] for k in ("src_vocab_size", "tgt_vocab_size", "joint_vocab")}
    vocab.update(pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID)
    if manifest.get("video"):
        vocab["video"] = {k: manifest["video"][k] for k in ("kind", "shape", "feature_dim")}
    return {
        "uri": uri,
        "experiment": experiment,
        "storage": storage,
        "data_dir": data_dir,
        "manifest": manifest,
        "src_json": src_json,
        "tgt_json": tgt_json,
        "vocab": vocab,
    }


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
    "amp",
    "grad_compression",
)
FINGERPRINT_FILE = "run_fingerprint.json"


def run_fingerprint(cfg: Config, prep: dict[str, Any]) -> dict[str, str]:
    """What defines a run: the preprocessed data (its folder name hashes the data config and
    the input files), both tokenizers, every model key and the training keys that change the
    result. A run_name resumes only where this is unchanged."""
    tok = prep["manifest"]["tokenizer"]
    out = {
        "data": os.path.basename(prep["data_dir"].rstrip("/")),
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


def run_training(cfg: Config) -> dict[str, Any]:
    prep = prepare(cfg)
    run_name = cfg.train.run_name or f"{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return fit_run(cfg, prep, run_name)


def fit_run(
    cfg: Config, prep: dict[str, Any], run_name: str, parent_run_id: str | None = None, in_tune: bool = False
) -> dict[str, Any]:
    """One MLflow run + one TorchTrainer fit. A sweep's trial passes its parent run and
    ``in_tune`` (metrics go to Tune too; the test split is left to the sweep's champion)."""
    t = cfg.train
    t.run_name = run_name
    run_dir = f"{prep['storage']}/{run_name}"
    # A sweep holds its own lock; Tune may restart a trial while the old one winds down.
    lock = None if in_tune else hold_named(run_dir, "train.run_name", run_name, "pipeline train")
    try:
        return _fit_run(cfg, prep, run_name, run_dir, parent_run_id, in_tune)
    finally:
        if lock is not None:
            lock.release()


def _fit_run(
    cfg: Config, prep: dict[str, Any], run_name: str, run_dir: str, parent_run_id: str | None, in_tune: bool
) -> dict[str, Any]:
    t = cfg.train
    uri, experiment, data_dir, manifest = prep["uri"], prep["experiment"], prep["data_dir"], prep["manifest"]
    fingerprint = run_fingerprint(cfg, prep)
    check_fingerprint(run_dir, fingerprint, f"train.run_name '{run_name}' ({tracking.redact(run_dir)})")
    tags = {"ray.run_name": run_name, "pipeline.data_dir": tracking.redact(data_dir)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id, resumed = tracking.open_run(uri, experiment, run_name, cfg.redacted_flat(), tags)
    print(
        f"[train] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment '{experiment}' at "
        f"{tracking.redact(uri)}",
        flush=True,
    )
    # The driver's logging is buffered like rank 0's: a server away at the end of a run that
    # trained well costs a spill file to replay, not the run.
    spill = tracking.spill_dir(prep["storage"], run_name)
    log = tracking.RunLogger(uri, run_id, spill, who="driver")
    if not resumed:
        log.log_text(cfg.redacted_yaml(), "config.yaml")
        with tempfile.TemporaryDirectory(prefix="pipeline-data-") as tmp:  # the logger keeps its own copies
            for name in ("manifest.json", "src_tokenizer.json", "tgt_tokenizer.json"):
                log.log_artifact(_local_copy(f"{data_dir}/{name}", tmp), "data")
        log.log_metrics(data_metrics(manifest), 0)
        log.flush()
    best_dir = f"{prep['storage']}/{run_name}/best"

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .loop import latest_checkpoint, train_loop

    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "vocab": prep["vocab"],
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "src_tokenizer": prep["src_json"],
            "tgt_tokenizer": prep["tgt_json"],
            "best_dir": best_dir,
            "latest_checkpoint": latest_checkpoint(run_dir),
            "fingerprint": fingerprint,
            "tracking_spill_dir": spill,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            placement_strategy=t.placement_strategy,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=prep["storage"],
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        # Reads take a quarter CPU: the workers hold whole CPUs, and a sweep's trial driver
        # a sliver more, so whole-CPU read tasks could wait forever on a small cluster.
        datasets={
            s: ray.data.read_parquet(f"{data_dir}/{s}", num_cpus=0.25).repartition(
                target_num_rows_per_block=rows_per_block(manifest["splits"][s], t.num_workers)
            )
            for s in ("train", "val")
        },
        dataset_config=_exactly_once_data_config(),
    )
    t0 = time.time()
    try:
        trainer.fit()
    except BaseException:
        # A trial that Tune stops (ASHA) lands here too: the sweep driver, which knows
        # stopped from failed, closes its run; a plain run failed.
        if not in_tune:
            log.end_run("FAILED")
        try:
            close_logger(log)
        except Exception as e:
            print(f"[tracking] closing the MLflow run failed too: {e}", flush=True)
        raise
    results: dict[str, Any] = {
        "run_id": run_id,
        "run_name": run_name,
        "tracking_uri": uri,
        "experiment": experiment,
        "best_dir": best_dir,
        "data_dir": data_dir,
        "train_seconds": round(time.time() - t0, 1),
        "video": is_video(cfg),
    }
    fs, best_root = fsspec.core.url_to_fs(best_dir)
    final = latest_checkpoint(run_dir)
    tested = _tested_at(uri, run_id)
    if not in_tune and fs.exists(f"{best_root}/model.pt"):
        if final and tested == str(final[0]):
            print(f"[test] already tested at step {final[0]}: nothing was trained since", flush=True)
        else:
            results.update(test_and_log(cfg, log, best_dir, data_dir, manifest, final[0] if final else 0))
            if final:
                log.set_tags({TESTED_TAG: str(final[0])})
    log.end_run("FINISHED")
    results["unsent_records"] = close_logger(log)
    return results


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


def data_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The manifest's counts as MLflow metrics: rows (pairs or captions) read, kept and
    dropped per reason; for video also clips and feature-cache hits."""
    out = {
        "data_rows_read": manifest["rows_read"],
        "data_rows_kept": manifest["rows_kept"],
        **{f"data_dropped_{k}": v for k, v in manifest["dropped"].items()},
    }
    if "videos" in manifest:
        out.update(
            {
                "data_videos_read": manifest["videos"]["read"],
                "data_videos_kept": manifest["videos"]["kept"],
                "data_cache_hits": manifest["cache"]["hits"],
                **{f"data_videos_dropped_{k}": v for k, v in manifest["videos"]["dropped"].items()},
            }
        )
    return out


def _local_copy(path: str, dest_dir: str) -> str:
    """A local path for a file that may live on shared storage (a URI): copied into
    ``dest_dir`` (the caller's temporary folder)."""
    if "://" not in path:
        return path
    dest = os.path.join(dest_dir, os.path.basename(path))
    fsspec.open(path, "rb").fs.get(path, dest)
    return dest


def test_and_log(
    cfg: Config, log: tracking.RunLogger, best_dir: str, data_dir: str, manifest: dict[str, Any], step: int = 0
) -> dict[str, Any]:
    """Decode the test split with the best checkpoint and log the scores at ``step`` (the
    run's last training step: a resumed run that trained on is tested again at a new step)."""
    t = cfg.train
    out: dict[str, Any] = {}
    res: dict[str, list] = {}
    if manifest["splits"]["test"]["kept"]:
        print(f"[test] decoding the test split with beam {t.test_beam_size}", flush=True)
        res = translate_split(best_dir, f"{data_dir}/test", t.test_beam_size, t.length_penalty, is_video(cfg))
        if is_video(cfg):
            scores = metrics.caption_scores(res["hyp"], res["tgt"], with_meteor=True)
            out = {f"test_{k}": v for k, v in scores.items()}
        else:
            out = {"test_bleu": metrics.bleu(res["hyp"], res["tgt"]), "test_chrf": metrics.chrf(res["hyp"], res["tgt"])}
        log.log_metrics(out, step)
        k = min(t.log_samples, len(res["src"]))
        picks = np.linspace(0, len(res["src"]) - 1, k).astype(int).tolist() if k else []
        if is_video(cfg):
            log.log_table(
                {
                    "video_id": [res["src"][i] for i in picks],
                    "references": [" | ".join(res["tgt"][i]) for i in picks],
                    "caption": [res["hyp"][i] for i in picks],
                },
                "samples/test_captions.json",
            )
            _log_contact_sheet(log, data_dir, [res["src"][i] for i in picks], res, picks)
        else:
            log.log_table(
                {
                    "source": [res["src"][i] for i in picks],
                    "reference": [res["tgt"][i] for i in picks],
                    "translation": [res["hyp"][i] for i in picks],
                },
                "samples/test_translations.json",
            )
        print("[test] " + " ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-bundle-") as tmp:  # the logger keeps its own copies
        local_best = _local_bundle(best_dir, tmp)
        for name in BUNDLE_FILES:
            log.log_artifact(os.path.join(local_best, name), "best_checkpoint")
        log.flush()
        if cfg.tracking.log_model:
            try:
                out["model_uri"] = tracking.log_model(
                    log.uri, log.run_id, local_best, is_video(cfg), _model_example(cfg, data_dir, res)
                )
            except Exception as e:
                if not tracking.is_outage(e):
                    raise
                # Not spilled: the bundle in best_checkpoint/ (queued above) reloads the same model.
                print(
                    f"[tracking] MLflow at {tracking.redact(log.uri)} is away: the model was not logged as an "
                    f"MLflow model (its files go to best_checkpoint/; {best_dir} has them too)",
                    flush=True,
                )
    return out


def _model_example(cfg: Config, data_dir: str, res: dict[str, list]) -> list[str]:
    """The logged model's input example: two test sentences, or one test clip file (a
    captioner's input is a clip file's path)."""
    if not is_video(cfg):
        return res.get("src", [])[:2] or ["a sentence ."]
    if not res.get("src") or cfg.data.frame_encoder == "frozen":  # frozen: predicting needs the backbone file
        return []
    row = ray.data.read_parquet(f"{data_dir}/test").select_columns(["path"]).take(1)
    return [row[0]["path"]] if row else []


def _local_bundle(bundle: str, dest: str) -> str:
    if "://" not in bundle:
        return bundle
    for name in BUNDLE_FILES:
        _local_copy(f"{bundle}/{name}", dest)
    return dest


def _log_contact_sheet(
    log: tracking.RunLogger, data_dir: str, video_ids: list[str], res: dict[str, list], picks: list[int]
) -> None:
    """A PNG of a few test clips (frames in a row) with predicted and reference captions."""
    from ray.data.expressions import col

    from ..data.video import clip_array, decode_clip
    from ..report import contact_sheet

    rows = {
        r["video_id"]: r
        for r in ray.data.read_parquet(f"{data_dir}/test")
        .filter(expr=col("video_id").is_in(video_ids))
        .select_columns(["video_id", "path", "data", "shape", "dtype"])
        .take_all()
    }
    items = []
    for vid, i in zip(video_ids, picks):
        r = rows[vid]
        if r["dtype"] == "uint8":
            frames = clip_array(r["data"], r["shape"], r["dtype"])
        else:  # features: show the clip itself when its file is a video
            try:
                with fsspec.open(r["path"], "rb") as f:
                    frames = decode_clip(f.read(), 6, 96, 0.0, r["path"])
            except Exception:
                frames = None
        items.append({"video_id": vid, "frames": frames, "hyp": res["hyp"][i], "refs": res["tgt"][i]})
    with tempfile.TemporaryDirectory(prefix="pipeline-sheet-") as tmp:  # the logger keeps its own copy
        path = os.path.join(tmp, "test_contact_sheet.png")
        contact_sheet(items, path)
        log.log_artifact(path, "samples")
