"""Test decoding and its logging: a model bundle decodes a preprocessed split on a Ray Data
actor pool, the task scores it, and a training run logs the scores, samples and model."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import fsspec
import numpy as np
import ray

from . import tracking
from .config import Config
from .data.output import read_split
from .inference import BUNDLE_FILES
from .tasks import Task, task_for


def decode_split(
    task: Task,
    bundle: str,
    split_dir: str,
    beam_size: int,
    length_penalty: float,
    use_gpu: bool = False,
    here_rows: int | None = None,
) -> dict[str, list]:
    """Decode a preprocessed split with a bundle on an actor pool: ``src``, ``tgt`` (the
    reference, or the list of references) and ``hyp`` lists, in id order. On GPUs when the
    cluster has some now, or with ``use_gpu`` (a run that trained on GPUs) even when it has
    none yet: an autoscaling GPU group that scaled to zero grows for the request. A split of
    at most ``here_rows`` rows (default: one decoding batch, ``task.test_batch_size``) on a
    cluster without GPUs is decoded in this process: an actor, a process that loads torch and
    the model, costs seconds more than decoding one batch."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = use_gpu or gpus > 0
    batch = (
        None
        if use_gpu
        else _small_split(split_dir, task.test_columns, task.test_batch_size if here_rows is None else here_rows)
    )
    if batch is not None:
        out = task.decoder()(bundle, beam_size, length_penalty)(batch) if len(batch["id"]) else {}
        order = np.argsort(out["id"], kind="stable") if out else []
        return task.decoded({k: [out[k][i] for i in order] for k in ("src", "tgt", "hyp")})
    n = max(1, min(4, int(ray.available_resources().get("CPU", 1))))
    if gpus:
        n = min(n, gpus)  # each actor holds a whole GPU: no more actors than GPUs, none left waiting
    ds = (
        ray.data.read_parquet(split_dir)
        .select_columns(list(task.test_columns))
        .map_batches(
            task.decoder(),
            fn_constructor_args=(bundle, beam_size, length_penalty),
            batch_size=task.test_batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n),
            num_gpus=1 if use_gpu else 0,
            batch_format="numpy",
        )
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    return task.decoded({k: [r[k] for r in rows] for k in ("src", "tgt", "hyp")})


def _small_split(split_dir: str, columns: Any, max_rows: int) -> dict[str, np.ndarray] | None:
    """A split's ``columns`` as one batch of numpy arrays (as Ray Data hands a map_batches
    function), if it has at most ``max_rows`` rows."""
    table = read_split(split_dir, list(columns), max_rows) if max_rows > 0 else None
    if table is None:
        return None
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def local_copy(path: str, dest_dir: str) -> str:
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
    run's last training step: a resumed run that trained on is tested again at a new step),
    a few samples, the bundle, and the MLflow model."""
    t, task = cfg.train, task_for(cfg)
    out: dict[str, Any] = {}
    scores: dict[str, float] = {}
    res: dict[str, list] = {}
    if manifest["splits"]["test"]["kept"]:
        print(f"[test] decoding the test split with beam {t.test_beam_size}", flush=True)
        res = decode_split(task, best_dir, f"{data_dir}/test", t.test_beam_size, t.length_penalty, t.use_gpu)
        scores = {f"test_{k}": v for k, v in task.scores(res["hyp"], res["tgt"], final=True).items()}
        out.update(scores)
        k = min(t.log_samples, len(res["src"]))
        picks = np.linspace(0, len(res["src"]) - 1, k).astype(int).tolist() if k else []
        log.log_table(*task.sample_table(res, picks))
        task.log_samples(log, data_dir, res, picks)
        print("[test] " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-bundle-") as tmp:  # the logger keeps its own copies
        local_best = _local_bundle(best_dir, tmp)
        for name in BUNDLE_FILES:
            log.log_artifact(os.path.join(local_best, name), "best_checkpoint")
        log.flush()
        if cfg.tracking.log_model:
            try:
                out["model_uri"] = tracking.log_model(
                    log.uri, log.run_id, local_best, task.is_captioning(), task.model_example(cfg, data_dir, res)
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
        if res and not task.is_captioning():
            from .review import log_review

            log_review(
                log, local_best, {"source": res["src"], "reference": res["tgt"], "translation": res["hyp"]}, task.metric
            )
    if scores:
        # After the model: the scores are the logged model's metrics too, on the test dataset.
        test_data = [d for d in tracking.split_datasets(data_dir, manifest) if d["context"] == "test"]
        model_id = out["model_uri"].removeprefix("models:/") if out.get("model_uri") else None
        log.log_metrics(scores, step, model_id=model_id, dataset=test_data[0] if test_data else None)
    return out


def _local_bundle(bundle: str, dest: str) -> str:
    if "://" not in bundle:
        return bundle
    for name in BUNDLE_FILES:
        local_copy(f"{bundle}/{name}", dest)
    return dest
