"""Typed configuration shared by every stage (one system: YAML profiles + `--set` overrides).

A profile is a YAML file whose keys mirror `PlatformConfig`; unknown keys are errors, so a typo
never silently falls back to a default. `config.load` reads a profile and applies overrides.
`models/` never imports this: stages translate the relevant section into model arguments.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    num_cpus: int | None = None
    object_store_memory_mb: int = 512
    # Keep every local Ray process on loopback (STACK.md).
    local_ip: str = "127.0.0.1"


class LakeConfig(Section):
    root: str = "data/lake"
    storage_options: dict[str, str] = Field(default_factory=dict)
    # Local folder for Great Expectations' project and Data Docs; None = <root>/_gx (local lakes).
    gx_dir: str | None = None

    def table(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    @property
    def events(self) -> str:
        return self.table("events")

    @property
    def quarantine(self) -> str:
        return self.table("events_quarantine")

    @property
    def ingest_batches(self) -> str:
        return self.table("_ingest_batches")

    @property
    def gx_root(self) -> str:
        if self.gx_dir:
            return self.gx_dir
        if "://" in self.root:
            raise ValueError("lake.gx_dir must be set when lake.root is remote")
        return self.table("_gx")


class BatchRulesConfig(Section):
    """Batch-level expectations (a failing batch is quarantined whole)."""

    min_rows_for_rates: int = Field(1000, description="rate rules apply to batches at least this large")
    max_null_rate: dict[str, float] = Field(
        default_factory=dict
    )
    action_share_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"impression": (0.0, 0.99)}
    )


class IngestConfig(Section):
    landing_dir: str = "data/landing"
    file_patterns: list[str] = Field(default_factory=lambda: ["*.jsonl", "*.jsonl.gz"])
    max_batch_bytes: int = Field(256 << 20, description="landing bytes per ingestion batch")
    poll_interval_s: float = 1.0
    min_event_time: str = "2000-01-01T00:00:00Z"
    max_future_s: int = 24 * 3600
    batch_rules: BatchRulesConfig = Field(default_factory=BatchRulesConfig)
    build_data_docs: bool = True


class SimulatorConfig(Section):
    seed: int = 7
    events: int = 200_000
    users: int = 5_000
    streamers: int = 500
    videos_per_streamer: int = 4
    topics: int = Field(20, ge=1, description="interest topics shared by users' tastes and items")
    # With ~2.5 requests per session and ~10 events per request, 5,000 users make ~1M events a day.
    sessions_per_user_day: float = Field(8.0, gt=0, description="how often an average user opens the app")
    start: str = "2026-01-05T00:00:00Z"
    impressions_per_request: int = 8
    events_per_file: int = 100_000
    gzip: bool = False
    malformed_rate: float = 0.0
    # Written next to (never inside) the landing folder: the true click probability per impression.
    oracle_dir: str = "data/oracle"


class DatasetsConfig(Section):
    root: str = "../shared/datasets"
    # Per-dataset user/item attribute tables (Parquet) go to <meta_dir>/<dataset>/.
    meta_dir: str = "data/datasets"


class OnlineStoreConfig(Section):
    type: Literal["sqlite", "redis"] = "sqlite"
    path: str = "data/feast/online.db"
    connection_string: str | None = None


class FeaturesConfig(Section):
    windows_s: list[int] = Field(default_factory=lambda: [300, 3600, 86400])
    sequence_length: int = 256
    online_store: OnlineStoreConfig = Field(default_factory=OnlineStoreConfig)


class PlatformConfig(Section):
    profile: str = "embedded"
    ray: RayConfig = Field(default_factory=RayConfig)
    lake: LakeConfig = Field(default_factory=LakeConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    datasets: DatasetsConfig = Field(default_factory=DatasetsConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
