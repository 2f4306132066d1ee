"""Shared fixtures: one Ray cluster per test session, the Multi30k copy in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MULTI30K = Path(os.environ.get("MULTI30K_DIR", REPO.parent / "shared" / "data" / "multi30k"))


@pytest.fixture(scope="session")
def multi30k() -> Path:
    if not (MULTI30K / "train.en.gz").exists():
        pytest.fail(f"Multi30k not found at {MULTI30K} (set MULTI30K_DIR)")
    return MULTI30K


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster, started once (startup costs seconds on 2 cores)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, dashboard_host="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
