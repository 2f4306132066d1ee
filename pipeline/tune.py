"""Ray Tune sweeps: every trial is a full Ray Train run, tracked as an MLflow child run.

The Train V2 pattern: a Tune *function* trainable builds and fits a TorchTrainer whose
reports reach Tune through ``TuneReportCallback``, so ASHA can stop bad trials on the
validation metric. The sweep is one MLflow parent run; each trial a child
(``mlflow.parentRunId``) named ``<sweep>-<trial id>``, so re-running an interrupted sweep
(same ``tune.name``) resumes the unfinished trials into the same children. At the end
the best trial is tested, its model logged and registered as a new version with the alias
``challenger``; ``champion`` moves to it only when it beats the champion's test score on
the same test data (``tracking.promote_if_better``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ray

from . import console, tracking
from .cluster import resolve_worker_cpus
from .config import Config, ConfigError, set_key, validate
from .evaluation import test_and_log
from .lock import hold_named
from .report import summarize
from .tasks import task_for
from .train.loop import latest_checkpoint
from .train.run import (
    Prepared,
    SigintRestored,
    check_fingerprint,
    close_logger,
    fit_run,
    prepare,
    run_fingerprint,
)

# A trial's driver only waits on its TorchTrainer, whose workers hold the CPUs; Tune
# refuses 0, so it asks for a sliver.
TRIAL_DRIVER_CPU = 0.01


def search_space(space: dict[str, Any], search: str) -> dict[str, Any]:
    from ray import tune

    dists = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}
    out: dict[str, Any] = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = tune.grid_search(value) if search == "grid" else tune.choice(value)
        else:
            ((dist, (low, high)),) = value.items()
            out[key] = dists[dist](low, high)
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    cfg = Config.from_dict(base)
    for key, value in params.items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def _run_trial(params: dict[str, Any], base: dict[str, Any], prep: Prepared, sweep: str, parent_run_id: str) -> None:
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    fit_run(
        trial_config(base, params), prep, f"{sweep}-{trial_id}", parent_run_id, in_tune=True, tags=searched_tags(params)
    )


SEARCHED_TAG, PARAM_TAG = "tune.searched", "tune.param."


def searched_tags(params: dict[str, Any]) -> dict[str, str]:
    """A trial's searched keys as tags: ``tune.searched`` lists them, ``tune.param.<key>`` holds
    each value. MLflow's UI lets one pick columns and chart axes but has no way to be told
    which come first; these name the few of the ~100 params that the sweep varied."""
    return {SEARCHED_TAG: ",".join(params), **{PARAM_TAG + k: str(v) for k, v in params.items()}}


def concurrent_trials(cfg: Config, now: dict[str, float] | None = None, most: dict[str, float] | None = None) -> int:
    """Trials at once: ``tune.max_concurrent_trials`` when set; otherwise as many trials at
    their most workers (``train.num_workers``) as the cluster holds at its largest: the
    autoscaler's maximum where known (``most``), else what is up ``now``. One CPU stays free
    for Ray Data's read tasks, or trials would starve each other's input. Trials are elastic
    (``train.min_workers``): one that does not fit yet starts smaller or waits for the nodes
    it asks for, so a cluster that grows during the sweep is used, and a GPU group scaled to
    zero does not make the sweep one trial at a time."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    now = ray.cluster_resources() if now is None else now
    most = autoscaler_max_resources() if most is None else most
    res = {k: max(now.get(k, 0.0), most.get(k, 0.0)) for k in set(now) | set(most)}
    t = cfg.train
    n = int((res.get("CPU", 1) - 1) // (t.num_workers * resolve_worker_cpus(t, sweep=True) + TRIAL_DRIVER_CPU))
    if t.use_gpu and res.get("GPU", 0) > 0:  # no GPU known at all: the CPUs decide, trials wait for GPUs
        n = min(n, int(res["GPU"] // (t.num_workers * t.gpus_per_worker)))
    return max(1, n)


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the Ray cluster launcher's copy on the head node


def autoscaler_max_resources(path: str = BOOTSTRAP_CONFIG) -> dict[str, float]:
    """What the cluster can grow to, from the autoscaler's config on this node: the head's
    resources plus each worker node type's resources x its ``max_workers``; {} when there is
    no such file (KubeRay, a fixed cluster) or a node type leaves its resources to detection."""
    import os

    import yaml

    path = os.path.expanduser(path)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        conf = yaml.safe_load(f) or {}
    types, head = conf.get("available_node_types") or {}, conf.get("head_node_type")
    out: dict[str, float] = {}
    for name, spec in types.items():
        if not spec.get("resources"):
            return {}
        count = 1 if name == head else int(spec.get("max_workers", 0))
        for k, v in spec["resources"].items():
            out[k] = out.get(k, 0.0) + float(v) * count
    return out


def run_sweep(cfg: Config) -> dict[str, Any]:
    tc = cfg.tune
    if not tc.space:
        raise ConfigError(
            "tune.space is empty: give values, e.g. tune.space.model.hidden_size=[256,512], "
            "or pick a prepared sweep, e.g. tune=hidden_depth"
        )
    sweep = tc.name or f"sweep-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with console.capture(console.log_file(f"{cfg.train.storage_path}/{sweep}"), sweep=True):
        prep = prepare(cfg, sweep=True)
        lock = hold_named(f"{prep.storage}/{sweep}", "tune.name", sweep, "pipeline tune")
        try:
            return _run_sweep(cfg, prep, sweep)
        finally:
            lock.release()


def sweep_fingerprint(cfg: Config, prep: Prepared) -> dict[str, str]:
    """A run's fingerprint without the searched keys, plus the search itself."""
    tc = cfg.tune
    out = {k: v for k, v in run_fingerprint(cfg, prep).items() if k not in tc.space}
    out.update(
        {
            "tune.space": json.dumps(tc.space, sort_keys=True),
            "tune.search": tc.search,
            "tune.num_samples": str(tc.num_samples),
            "tune.scheduler": tc.scheduler,
            "tune.metric": tc.metric or task_for(cfg).metric,
            "tune.mode": tc.mode,
            "tune.grace_period": str(tc.grace_period),
            "tune.reduction_factor": str(tc.reduction_factor),
        }
    )
    return out


def _run_sweep(cfg: Config, prep: Prepared, sweep: str) -> dict[str, Any]:
    from ray import tune

    tc = cfg.tune
    uri, experiment, storage = prep.uri, prep.experiment, prep.storage
    check_fingerprint(
        f"{storage}/{sweep}", sweep_fingerprint(cfg, prep), f"tune.name '{sweep}' ({tracking.redact(storage)}/{sweep})"
    )
    metric = tc.metric or task_for(cfg).metric
    params = {
        "tune.space": json.dumps(tc.space),
        "tune.search": tc.search,
        "tune.scheduler": tc.scheduler,
        "tune.num_samples": tc.num_samples,
        "tune.metric": metric,
        "tune.mode": tc.mode,
        **cfg.flat(),
    }
    parent_id, resumed = tracking.open_run(
        uri, experiment, sweep, params, {"pipeline.kind": "sweep", SEARCHED_TAG: ",".join(tc.space)}, prep.context
    )
    print(f"[tune] sweep '{sweep}' ({'resumed' if resumed else 'new'}): MLflow parent run {parent_id}", flush=True)
    if not resumed:  # the runs table's Dataset column: every trial trains on these
        inputs = tracking.RunLogger(uri, parent_id, tracking.spill_dir(storage, sweep))
        inputs.log_inputs(tracking.split_datasets(prep.data_dir, prep.manifest))
        close_logger(inputs)

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=cfg.to_dict(), prep=prep, sweep=sweep, parent_run_id=parent_id),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    path = f"{storage}/{sweep}"
    if tune.Tuner.can_restore(path):
        print(f"[tune] resuming from {path}: finished trials are kept, unfinished ones continue", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        scheduler = None
        if tc.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # max_t past the last epoch: a trial that runs its course ends on its own (and
            # closes its MLflow run then) rather than being stopped by the scheduler.
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=max(cfg.train.max_epochs, tc.grace_period) + 1,
                grace_period=tc.grace_period,
                reduction_factor=tc.reduction_factor,
            )
        search_alg = None
        if tc.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch()
        n = concurrent_trials(cfg)
        print(f"[tune] {tc.search} search, scheduler {tc.scheduler}, up to {n} trial(s) at once", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(tc.space, tc.search),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=tc.mode,
                num_samples=tc.num_samples,
                scheduler=scheduler,
                search_alg=search_alg,
                max_concurrent_trials=n,
            ),
            run_config=tune.RunConfig(name=sweep, storage_path=storage, verbose=1),
        )
    # Ctrl-C: Tune's handler (installed in the main thread) saves the sweep's state, puts the
    # handler from before back and lets fit() return with the trials as they were; a second
    # Ctrl-C raises in fit().
    try:
        with SigintRestored() as sigint, console.hidden():  # console: Tune's status tables
            grid = tuner.fit()
    except KeyboardInterrupt:
        _interrupted(uri, parent_id, sweep)
    if sigint.caught and not os.environ.get("TUNE_DISABLE_SIGINT_HANDLER"):
        _interrupted(uri, parent_id, sweep)
    failed = {f"{sweep}-{r.metrics.get('trial_id', '')}": str(r.error) for r in grid if r.error}
    rows = summarize(uri, parent_id, metric, tc.mode, failed)
    if not rows:
        tracking.end_run(uri, parent_id, "FAILED")
        raise RuntimeError(f"no trial of sweep '{sweep}' produced a result; errors: {list(failed.values())[:1]}")
    best = rows[0]
    out: dict[str, Any] = {
        "sweep": sweep,
        "parent_run_id": parent_id,
        "trials": rows,
        "best": best,
        "tracking_uri": uri,
        "experiment": experiment,
    }
    best_cfg = trial_config(cfg.to_dict(), best["params"])
    best_dir = f"{storage}/{best['run_name']}/best"
    final = latest_checkpoint(f"{storage}/{best['run_name']}")
    # Buffered like a training run's logging: a server away now leaves spill files, not a crash.
    best_log = tracking.RunLogger(uri, best["run_id"], tracking.spill_dir(storage, best["run_name"]))
    tested = test_and_log(best_cfg, best_log, best_dir, prep.data_dir, prep.manifest, final[0] if final else 0)
    out.update(tested)
    out["unsent_records"] = close_logger(best_log)
    if tested.get("model_uri"):
        out.update(_register(cfg, prep, sweep, best["run_name"], metric, tested))  # `pipeline tune` prints why
    log = tracking.RunLogger(uri, parent_id, tracking.spill_dir(storage, sweep))
    log.log_table(
        {k: [r.get(k) for r in rows] for k in rows[0] if k != "params"}
        | {"params": [json.dumps(r["params"]) for r in rows]},
        "trials.json",
    )
    log.log_metrics({f"best_{metric}": best["best"], **{k: v for k, v in tested.items() if k.startswith("test_")}}, 0)
    log.set_tags({"best_trial_run_id": best["run_id"], "best_trial": best["run_name"]})
    _log_figures(uri, parent_id, log)
    log.end_run("FINISHED" if not failed else "FAILED")
    out["unsent_records"] += close_logger(log)
    return out


def _interrupted(uri: str, parent_id: str, sweep: str) -> None:
    """Ctrl-C: nothing is ranked, tested or promoted (a champion from part of a sweep); the
    parent and the trials that were training are closed as KILLED (the same tune.name goes on
    and reopens them), and the program stops as interrupted."""
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    children = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10_000
    )
    stopped = [ch for ch in children if ch.info.status == "RUNNING"]
    for ch in stopped:
        c.set_terminated(ch.info.run_id, "KILLED")
    c.set_terminated(parent_id, "KILLED")
    print(
        f"[tune] interrupted: {len(children) - len(stopped)} trial(s) ended, {len(stopped)} stopped while training; "
        f"nothing was tested or promoted; the same command (tune.name={sweep}) goes on from where it stopped",
        flush=True,
    )
    raise KeyboardInterrupt


def _log_figures(uri: str, parent_id: str, log: tracking.RunLogger) -> None:
    """The report's figures onto the parent run (``report/``), as `pipeline report` draws them."""
    import matplotlib.pyplot as plt

    from .report import figures, sweep_of

    try:
        sweep = sweep_of(uri, tracking.client(uri).get_run(parent_id))
    except Exception as e:
        if not tracking.is_outage(e):
            raise
        print(f"[tracking] MLflow is away: no report figures on the sweep's run ({tracking.redact(str(e))[:200]})")
        return
    for name, fig in figures(sweep).items():
        log.log_figure(fig, f"report/{name}")
        plt.close(fig)


def champion_metric(metric: str, mode: str, tested: dict[str, Any], default: str) -> tuple[str, str]:
    """The test metric that stands for the sweep's validation metric (val_bleu -> test_bleu),
    and its mode; a validation metric with no test counterpart (val_loss) falls back to the
    task's default one (``default``: val_bleu -> test_bleu, val_cider -> test_cider; higher is better)."""
    counterpart = "test_" + metric.removeprefix("val_")
    if counterpart in tested:
        return counterpart, mode
    return "test_" + default.removeprefix("val_"), "max"


def _register(
    cfg: Config, prep: Prepared, sweep: str, run_name: str, metric: str, tested: dict[str, Any]
) -> dict[str, Any]:
    """The best trial's model becomes a new version with the alias ``challenger``, tagged
    with what it scored on which data; ``champion`` moves to it only when it wins."""
    tc, uri = cfg.tune, prep.uri
    name = tc.register_as or f"{prep.experiment}-{cfg.data.name}"
    key, mode = champion_metric(metric, tc.mode, tested, task_for(cfg).metric)
    fingerprint = tracking.data_fingerprint(prep.data_dir, prep.manifest)
    tags = {
        tracking.SWEEP_TAG: sweep,
        "pipeline.trial": run_name,
        tracking.METRIC_TAG: key,
        tracking.DATA_TAG: fingerprint,
        tracking.COMMIT_TAG: tracking.git_commit() or "unknown",
    }
    if key in tested:
        tags[tracking.VALUE_TAG] = repr(float(tested[key]))
    version = tracking.register_challenger(uri, tested["model_uri"], name, tags)
    promoted, reason = tracking.promote_if_better(uri, name, version, key, mode, fingerprint)
    champion = (
        version if promoted else str(tracking.client(uri).get_model_version_by_alias(name, tracking.CHAMPION).version)
    )
    return {
        "registered_model": name,
        "registered_version": version,
        "promoted": promoted,
        "promotion": reason,
        "champion_version": champion,
    }


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    keys = list(rows[0]["params"]) if rows else []
    head = ["rank", *keys, metric, "validations", "status", "trial"]
    lines = [head]
    for i, r in enumerate(rows, 1):
        status = "stopped early" if r["early_stopped"] else r["status"].lower()
        lines.append(
            [
                str(i),
                *(str(r["params"][k]) for k in keys),
                f"{r['best']:.2f}",
                str(r["validations"]),
                status,
                r["run_name"],
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines)
