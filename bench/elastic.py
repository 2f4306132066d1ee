"""Elastic training through a changing cluster, on a real 3-node Ray cluster on loopback.

One elastic `pipeline train` (train.min_workers=1, train.num_workers=3, one worker per node)
against a head and two worker nodes, a real `mlflow server` on 127.0.0.1. While it trains:
1. the raylet of a worker node hosting a training worker is SIGKILLed mid-epoch (node loss);
2. the other worker node is drained with a deadline (`ray drain-node`, reason preemption),
   and killed when the deadline is up, as a spot reclaim would;
3. a fresh node joins; the run grows onto it.
The run must finish as one MLflow run. Printed (one JSON line, then a summary): seconds from
the node loss to training again, steps lost to the preemption (steps trained after the
preemption's checkpoint and thrown away; target 0), steps redone after the node loss and the
growth, throughput (target tokens/s) per world size, and the exactly-once audit of
``train.trace_examples`` (every example of every finished epoch trained on once; none twice in
the unfinished one).

    python bench/elastic.py [--json FILE] [--workdir DIR] [overrides ...]

With ``--sweep``: a 4-trial grid (`pipeline tune`, one 2-CPU worker a trial,
``tune.max_concurrent_trials=3``, what the cluster will grow to) starts on the head alone
(room for one trial); two nodes join once the first trial trains. Printed: the most trials
training at once before and after the joins.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: it reads the mode then
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the loopback harness
from loopback import loopback_cluster, mlflow_server, stop_process_group, wait_until

# Ray's default node failure detection (GCS health checks, about 15-30 s to call a raylet
# dead): tighter settings had a busy 2-core machine declare live nodes dead.
FAST_HEALTH: dict[str, str] = {}
DRAIN_DEADLINE_S = 12
EXPERIMENT = "elastic"
RUN = "elastic"


def train_args(tmp: Path, uri: str, overrides: list[str]) -> list[str]:
    return [
        "data=demo_text",
        "model=small",
        "model.embedding_size=32",
        "model.hidden_size=32",
        f"data.root={tmp}/demo",
        "data.demo_size=6000",
        "data.vocab_size=300",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        f"train.run_name={RUN}",
        "train.num_workers=3",
        "train.min_workers=1",
        "train.cpus_per_worker=2",  # 3-CPU nodes: one worker each, a CPU left for Ray Data
        "train.placement_strategy=SPREAD",
        "train.resize_interval_s=5",
        "train.max_failures=3",
        "train.max_epochs=4",
        "train.batch_tokens=400",
        "train.eval_every=40",
        f"train.trace_examples={tmp}/trace",
        "train.test_beam_size=1",
        "train.log_samples=0",
        "tracking.log_model=false",
        "tracking.system_metrics_s=0",
        f"tracking.tracking_uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        *overrides,
    ]


def audit(trace: Path) -> dict:
    """Exactly-once across restarts: each attempt (a set of worker processes, ordered by its
    first record) counts up to the step the next attempt resumed from; later steps of it were
    redone. Returns the figures and whether every finished epoch saw each example once."""
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for path in trace.glob("*.jsonl"):
        by_pid[int(path.stem.split("-")[1])] += [json.loads(line) for line in path.read_text().splitlines()]
    # The ranks of one attempt start at the same step within seconds; two attempts may start
    # at the same step (one killed before its next checkpoint), minutes apart.
    groups: list[tuple[int, float, list[dict]]] = []  # (first step, first time, records)
    for recs in sorted(by_pid.values(), key=lambda rs: min(r["t"] for r in rs)):
        first, t0 = min(r["step"] for r in recs), min(r["t"] for r in recs)
        if groups and groups[-1][0] == first and t0 - groups[-1][1] < 30:
            groups[-1][2].extend(recs)
        else:
            groups.append((first, t0, list(recs)))
    order = [g[0] for g in groups]
    counted: dict[int, Counter] = defaultdict(Counter)
    redone = []
    for k, (_, _, recs) in enumerate(groups):
        upto = order[k + 1] - 1 if k + 1 < len(order) else float("inf")
        redone.append(len({r["step"] for r in recs if r["step"] > upto}))
        for r in recs:
            if r["step"] <= upto:
                counted[r["epoch"]].update(r["ids"])
    whole = {i for c in counted.values() for i in c}
    last = max(counted)
    twice = {e: sum(1 for n in c.values() if n > 1) for e, c in counted.items()}
    missing = {e: len(whole - set(c)) for e, c in counted.items() if e != last}
    return {
        "attempts": len(order),
        "attempt_first_steps": order,
        "steps_redone_per_restart": redone[:-1],
        "epochs": sorted(counted),
        "examples": len(whole),
        "twice": twice,
        "missing_in_finished_epochs": missing,
        "exactly_once": not any(twice.values()) and not any(missing.values()),
    }


def launch(command: str, args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A `pipeline` command in its own process group, its output to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", command, *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def node_of_raylet_pid(cluster: loopback_cluster, i: int) -> int:
    import psutil

    for p in psutil.Process(cluster.procs[i].pid).children(recursive=True):
        if p.name() == "raylet":
            return p.pid
    raise RuntimeError(f"no raylet under node{i}")


def scenario(tmp: Path, overrides: list[str]) -> dict:
    import ray
    import ray.util.state
    from mlflow.tracking import MlflowClient

    (tmp / "trace").mkdir(parents=True, exist_ok=True)
    mlflow, uri = mlflow_server(tmp, tmp / "mlflow.log")
    events: dict = {}
    train = None
    try:
        with loopback_cluster(nodes=3, cpus=3, logs=tmp / "logs", env=FAST_HEALTH, timeout=300) as cluster:
            env = {**cluster.env, "RAY_ADDRESS": cluster.gcs, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
            t0 = time.time()
            train = launch("train", train_args(tmp, uri, overrides), tmp / "train.log", env)
            ray.init(address=cluster.gcs, logging_level="ERROR", log_to_driver=False)
            c = MlflowClient(uri)

            def run():
                exp = c.get_experiment_by_name(EXPERIMENT)
                return c.search_runs([exp.experiment_id])[0] if exp else None

            def steps(key):
                r = run()
                return c.get_metric_history(r.info.run_id, key) if r else []

            def alive():
                if train.poll() is not None:
                    raise RuntimeError(
                        f"training exited ({train.returncode}): {(tmp / 'train.log').read_text()[-3000:]}"
                    )
                return True

            def world_at_least(n, after_step=0):
                alive()
                return any(m.value >= n and m.step > after_step for m in steps("num_workers"))

            wait_until(lambda: world_at_least(3), "training on 3 workers", 600)
            controller = ray.util.state.list_actors(
                filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")]
            )
            driver_node = controller[0].node_id
            workers = {
                a.node_id
                for a in ray.util.state.list_actors(
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                )
            }
            nodes = {n["NodeID"]: cluster.index(n) for n in ray.nodes() if n["Alive"]}
            victims = [nodes[n] for n in sorted(workers) if n != driver_node and nodes.get(n, 0) > 0]
            assert len(victims) >= 2, f"need two worker nodes without the driver: {nodes} {workers} {driver_node}"
            node_hex = {i: n for n, i in nodes.items()}

            # 1. Node loss: SIGKILL the raylet of a node hosting a worker, mid-epoch.
            wait_until(lambda: alive() and max(m.step for m in steps("train_loss")) >= 60, "step 60", 300)
            os.kill(node_of_raylet_pid(cluster, victims[0]), signal.SIGKILL)
            events["node_lost_at"] = time.time()
            events["step_at_loss"] = max(m.step for m in steps("train_loss"))

            def resumed_after(t):
                alive()
                tag = run().data.tags.get("pipeline.resumed_at")
                return tag and float(tag) > t

            wait_until(lambda: resumed_after(events["node_lost_at"]), "training again after the node loss", 300)
            events["seconds_node_loss_to_training"] = round(
                float(run().data.tags["pipeline.resumed_at"]) - events["node_lost_at"], 1
            )
            resumed = int(run().data.tags["pipeline.resumed_from_step"])

            # 2. Preemption: drain the other worker node with a deadline; it goes at the deadline.
            wait_until(lambda: world_at_least(2, resumed + 20), "steps on 2 workers", 300)
            drained = victims[1]
            subprocess.run(
                [
                    cluster.ray_bin,
                    "drain-node",
                    f"--address={cluster.gcs}",
                    f"--node-id={node_hex[drained]}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message=spot reclaim (bench)",
                    f"--deadline-remaining-seconds={DRAIN_DEADLINE_S}",
                ],
                check=True,
                env=cluster.env,
                capture_output=True,
                timeout=60,
            )
            events["drained_at"] = time.time()
            time.sleep(DRAIN_DEADLINE_S)
            stop_process_group(cluster.procs[drained])  # the reclaim
            wait_until(lambda: resumed_after(events["drained_at"]), "training again after the drain", 300)
            tags = run().data.tags
            events["preempted_at_step"] = int(tags.get("pipeline.preempted_at_step", -1))
            events["resumed_from_step_after_drain"] = int(tags["pipeline.resumed_from_step"])
            events["seconds_drain_to_training"] = round(float(tags["pipeline.resumed_at"]) - events["drained_at"], 1)

            # 3. A node comes back: the run grows onto it.
            cluster.add_node()
            events["node_added_at"] = time.time()
            after = events["resumed_from_step_after_drain"]
            wait_until(lambda: world_at_least(2, after), "training on 2 workers again", 300)
            events["seconds_node_added_to_grown"] = round(
                float(run().data.tags["pipeline.resumed_at"]) - events["node_added_at"], 1
            )
            train.wait(600)
            events["train_returncode"] = train.returncode
            events["wall_s"] = round(time.time() - t0, 1)
            r = run()
            world = {m.step: m.value for m in steps("num_workers")}
            tps = defaultdict(list)
            for m in steps("train_tokens_per_s"):
                tps[int(world.get(m.step, 0))].append(m.value)
            train_steps = [m.step for m in steps("train_loss")]
            exp_runs = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])
            ray.shutdown()
    finally:
        if train is not None and train.poll() is None:
            stop_process_group(train)
        stop_process_group(mlflow)
    out = {
        "bench": "elastic",
        "cpus": os.cpu_count(),
        "mlflow_runs": len(exp_runs),
        "status": r.info.status,
        "world_sizes_over_steps": [int(world[s]) for s in sorted(world)],
        "log_steps_unique_and_contiguous": train_steps == list(range(train_steps[0], train_steps[-1] + 1, 20)),
        "tokens_per_s_by_world": {w: round(statistics.median(v), 1) for w, v in sorted(tps.items())},
        "steps_lost_to_preemption": None,
        **events,
        "audit": audit(tmp / "trace"),
    }
    out["steps_lost_to_preemption"] = events["preempted_at_step"] - events["resumed_from_step_after_drain"]
    return out


SWEEP = "joining"
SWEEP_TRIALS = 4


def sweep_args(tmp: Path, uri: str, overrides: list[str]) -> list[str]:
    return [
        "data=demo_text",
        "model=small",
        "model.embedding_size=32",
        f"data.root={tmp}/demo",
        "data.demo_size=2000",
        "data.vocab_size=300",
        f"data.output_dir={tmp}/data",
        f"train.storage_path={tmp}/ray",
        "train.num_workers=1",
        "train.cpus_per_worker=2",  # 3-CPU nodes: one trial each
        "train.max_epochs=2",
        "train.batch_tokens=400",
        "train.test_beam_size=1",
        "train.log_samples=0",
        "tracking.log_model=false",
        "tracking.system_metrics_s=0",
        f"tracking.tracking_uri={uri}",
        f"tracking.experiment={SWEEP}",
        f"tune.name={SWEEP}",
        "tune.search=grid",
        "tune.scheduler=none",
        f"tune.space.model.hidden_size=[{','.join(str(32 + 16 * i) for i in range(SWEEP_TRIALS))}]",
        # What the cluster will grow to (no autoscaler config on loopback): three nodes, a trial each.
        "tune.max_concurrent_trials=3",
        *overrides,
    ]


def most_at_once(spans: list[tuple[float, float]], start: float, end: float) -> int:
    """The most spans (first, last training log) that overlap at some moment in [start, end)."""
    points = sorted({max(a, start) for a, b in spans if a < end and b >= start})
    return max((sum(1 for a, b in spans if a <= p <= b) for p in points), default=0)


def sweep_scenario(tmp: Path, overrides: list[str]) -> dict:
    """A sweep that starts on a one-node cluster (room for one trial) with nodes joining once
    the first trial trains: how many trials trained at once before and after."""
    import ray
    from mlflow.tracking import MlflowClient

    mlflow, uri = mlflow_server(tmp, tmp / "mlflow.log")
    sweep = None
    try:
        with loopback_cluster(nodes=1, cpus=3, logs=tmp / "logs", env=FAST_HEALTH, timeout=300) as cluster:
            t0 = time.time()
            env = {**cluster.env, "RAY_ADDRESS": cluster.gcs}
            sweep = launch("tune", sweep_args(tmp, uri, overrides), tmp / "tune.log", env)
            ray.init(address=cluster.gcs, logging_level="ERROR", log_to_driver=False)  # add_node counts nodes
            c = MlflowClient(uri)

            def trials() -> list:
                if sweep.poll() is not None and sweep.returncode != 0:
                    raise RuntimeError(
                        f"the sweep exited ({sweep.returncode}): {(tmp / 'tune.log').read_text()[-3000:]}"
                    )
                exp = c.get_experiment_by_name(SWEEP)
                runs = c.search_runs([exp.experiment_id]) if exp else []
                return [r for r in runs if r.data.tags.get("mlflow.parentRunId")]

            def training(run) -> list:
                return c.get_metric_history(run.info.run_id, "train_loss")

            wait_until(lambda: any(training(r) for r in trials()), "the first trial training", 600)
            joined_at = time.time()
            cluster.add_node(wait=False)
            cluster.add_node()
            sweep.wait(1800)
            wall = time.time() - t0
            spans = []
            for r in trials():
                h = sorted(m.timestamp / 1000 for m in training(r))
                if h:
                    spans.append((h[0], h[-1]))
            ray.shutdown()
    finally:
        if sweep is not None and sweep.poll() is None:
            stop_process_group(sweep)
        stop_process_group(mlflow)
    return {
        "bench": "elastic-sweep",
        "cpus": os.cpu_count(),
        "returncode": sweep.returncode,
        "trials_trained": len(spans),
        "most_trials_at_once_before_nodes_joined": most_at_once(spans, 0, joined_at),
        "most_trials_at_once_after": most_at_once(spans, joined_at, float("inf")),
        "trial_training_spans_s": sorted((round(a - t0, 1), round(b - t0, 1)) for a, b in spans),
        "nodes_joined_at_s": round(joined_at - t0, 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--sweep", action="store_true", help="the sweep scenario: nodes join a running sweep")
    ap.add_argument("--workdir", help="a folder for the cluster's logs, data and MLflow (default: a fresh one in /tmp)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-elastic-"))
    tmp.mkdir(parents=True, exist_ok=True)
    out = (sweep_scenario if args.sweep else scenario)(tmp, args.overrides)
    line = json.dumps(out)
    print(line)
    if args.json:
        Path(args.json).write_text(line)
    if args.sweep:
        print(
            f"elastic sweep: {out['trials_trained']} trials; at most {out['most_trials_at_once_before_nodes_joined']} "
            f"training at once on the first node, {out['most_trials_at_once_after']} after two nodes joined "
            f"(at {out['nodes_joined_at_s']} s); {out['wall_s']} s"
        )
        return
    a = out["audit"]
    print(
        f"elastic: node loss -> training again in {out['seconds_node_loss_to_training']} s; drain -> training again in "
        f"{out['seconds_drain_to_training']} s, {out['steps_lost_to_preemption']} steps lost to the preemption; "
        f"node added -> grown in {out['seconds_node_added_to_grown']} s; tokens/s by world size "
        f"{out['tokens_per_s_by_world']}; {a['attempts']} attempts, steps redone {a['steps_redone_per_restart']}; "
        f"exactly once: {a['exactly_once']}; {out['mlflow_runs']} MLflow run(s), {out['status']}, {out['wall_s']} s"
    )


if __name__ == "__main__":
    main()
