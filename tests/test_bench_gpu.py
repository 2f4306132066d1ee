"""bench/gpu.py works before a GPU machine is at hand: its dry run (the same code on the CPU,
tiny sizes) measures part (a) where neither Ray nor MLflow can be imported, skips (b) and (c)
there saying why, and with Ray and MLflow runs (b) and (c) end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.trainer import cpu_has_bf16

REPO = Path(__file__).resolve().parent.parent
# Ray and MLflow made unimportable, as on a bare GPU image: a None entry in sys.modules makes
# `import ray` raise ImportError.
NO_RAY = (
    "import runpy, sys; sys.modules['ray'] = None; sys.modules['mlflow'] = None; "
    "sys.argv = ['bench/gpu.py', *sys.argv[1:]]; runpy.run_path('bench/gpu.py', run_name='__main__')"
)


def test_the_dry_run_of_part_a_needs_neither_ray_nor_mlflow(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-c", NO_RAY, "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    a = res["a"]
    assert res["dry_run"] and a["device"] == "cpu" and a["tokens_per_step"] == 8 * 7  # 8 targets of 6 + EOS
    if not cpu_has_bf16():  # bf16 on a CPU needs it in hardware: skipped, saying why
        assert "no AVX512-BF16 or AMX" in a["dtypes"]["bf16"]["skipped"]
    for dt in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        r = a["dtypes"][dt]
        assert r["ours"]["tokens_per_s"] > 0 and r["bare"]["tokens_per_s"] > 0
        assert r["ratio_ours_over_bare"] == pytest.approx(r["bare"]["step_ms"] / r["ours"]["step_ms"], rel=1e-2)
        assert r["ours"]["mfu"] == "unknown"  # no peak for a CPU: never a made-up MFU
    assert "fp16 needs a GPU" in a["dtypes"]["fp16"]["skipped"]
    for part in ("b", "c"):
        assert "Ray or MLflow is not installed" in res[part]["skipped"]
        assert "device-setup.sh" in res[part]["skipped"]
    assert "[a] fp32: ours" in proc.stdout


def test_unknown_parts_and_dtypes_are_refused():
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run", "--parts", "a,d", "--dtypes", "fp8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown part or dtype: d, fp8" in proc.stderr


@pytest.mark.slow
def test_the_dry_run_of_parts_b_and_c_trains_tests_and_measures_the_feed(ray_session, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    res = gpu.main(["--dry-run", "--parts", "b,c", "--out", str(tmp_path / "gpu.json")])
    b, c = res["b"], res["c"]
    assert isinstance(b["test_bleu"], float) and b["train_s"] > 0 and b["met_bleu"] is False
    assert c["windows"] >= 1 and c["pipeline_tokens_per_s_median"] > 0
    assert 0 <= c["data_wait_fraction_median"] <= c["data_wait_fraction_max"] <= 1
    assert c["trainer_alone"]["steps"] >= 1 and c["trainer_alone"]["tokens_per_s"] > 0
    assert c["mfu_median"] == "unknown"  # logged on GPUs only
