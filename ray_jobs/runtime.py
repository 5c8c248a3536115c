"""Start or join Ray the same way in every stage entrypoint, test and benchmark."""

from __future__ import annotations

import logging
import os

from config.schema import RayConfig

# Without this, Ray maps 127.0.0.1 back to the machine's address (STACK.md): set before import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray


def init_ray(cfg: RayConfig, **kwargs) -> None:
    """Join `cfg.address` (a cluster, or "auto" inside a submitted job) or start a local Ray on loopback."""
    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING, **kwargs)
        return
    ray.init(
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_memory_mb << 20,
        _node_ip_address=cfg.local_ip,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        **kwargs,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
