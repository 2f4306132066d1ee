"""Elastic training on a real 3-node Ray cluster on loopback (bench/elastic.py): a node's
raylet SIGKILLed mid-epoch, another node drained with a deadline and then killed, a node
added back. The run finishes as one MLflow run, shrinking 3 -> 2 -> 1 workers and growing
again, loses no step to the preemption, and trains on every example of every epoch once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_training_goes_on_through_node_loss_drain_and_a_new_node(tmp_path):
    out = tmp_path / "figures.json"
    p = subprocess.run(
        [sys.executable, "bench/elastic.py", "--json", str(out), "--workdir", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(out.read_text())
    print("\n" + p.stdout.splitlines()[-1])
    assert r["train_returncode"] == 0 and r["mlflow_runs"] == 1 and r["status"] == "FINISHED"
    worlds = r["world_sizes_over_steps"]
    assert worlds[0] == 3 and 1 in worlds and worlds[-1] == 2, worlds  # shrank, then grew
    assert r["log_steps_unique_and_contiguous"], "duplicate or missing steps in MLflow"
    assert r["steps_lost_to_preemption"] == 0 and r["preempted_at_step"] > 0
    a = r["audit"]
    assert a["attempts"] >= 4 and a["exactly_once"], a
    assert r["seconds_node_loss_to_training"] > 0
