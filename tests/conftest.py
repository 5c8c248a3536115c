"""Shared fixtures: one local Ray for the whole session (on loopback), the real-data path, GPU skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped when none is present")
    # Small test models run fastest single-threaded, and Ray's workers need the other core.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started once per test session (an idle cluster is ~800 MiB and 5-8 s to start)."""
    import ray

    from config.schema import RayConfig
    from ray_jobs.runtime import init_ray

    init_ray(RayConfig(num_cpus=2, object_store_memory_mb=256))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on 127.0.0.1 (free port, no persistence) for the session; fails if not installed."""
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def datasets_dir() -> Path:
    if not DATASETS.exists():
        pytest.skip(f"real datasets not found at {DATASETS}")
    return DATASETS
