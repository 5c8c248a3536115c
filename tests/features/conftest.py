"""Shared fixtures: one small lake with its feature tables computed once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import config
from config.schema import OnlineStoreConfig, PlatformConfig
from features.job import FeatureJob, FeatureJobReport
from features.spec import FeatureStoreSpec
from tests.features.events import Reference, synthetic_events, write_events


def lake_config(root: Path, *overrides: str) -> PlatformConfig:
    """A config whose lake and Feast files live under `root` (short sequences to exercise truncation)."""
    return config.load(None, [f"lake.root={root / 'lake'}", f"features.feast_dir={root / 'feast'}",
                              f"features.online_store.path={root / 'feast' / 'online.db'}",
                              "features.sequence_length=8", "features.sequence_hop_s=600", "features.partitions=2",
                              *overrides])


def online_config(cfg: PlatformConfig, folder: Path, backend: str, redis_server=None) -> PlatformConfig:
    """The same lake with its own Feast registry and online store (a SQLite file or the test Redis)."""
    out = cfg.model_copy(deep=True)
    out.features.feast_dir = str(folder)
    out.features.online_store = (
        OnlineStoreConfig(type="redis", connection_string=redis_server.connection_string) if backend == "redis"
        else OnlineStoreConfig(type="sqlite", path=str(folder / "online.db")))
    return out


@dataclass
class FeatureLake:
    cfg: PlatformConfig
    events: list[dict]
    report: FeatureJobReport
    ref: Reference

    @property
    def spec(self) -> FeatureStoreSpec:
        return self.ref.spec


@pytest.fixture(scope="session")
def feature_lake(tmp_path_factory, ray_local) -> FeatureLake:
    root = tmp_path_factory.mktemp("feature_lake")
    cfg = lake_config(root)
    events = synthetic_events()
    write_events(cfg.lake.events, events)
    report = FeatureJob(cfg).run(materialize=False)
    return FeatureLake(cfg, events, report, Reference(FeatureStoreSpec.from_config(cfg.features), events))


def materialized_store(cfg: PlatformConfig, report: FeatureJobReport):
    """Register the definitions and load the job's rows into the online store (what the job's run does)."""
    from features.repo import apply_definitions

    store = apply_definitions(cfg)
    FeatureJob(cfg).materialize(report, store)
    return store
