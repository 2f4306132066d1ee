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

    from pipeline.cluster import init_ray

    # The same local cluster `pipeline tune` starts for 1-worker trials on this 2-core
    # machine (3 logical CPUs), so resource starvation shows up here as for users.
    init_ray(min_cpus=1)
    yield ray
    ray.shutdown()
