"""The feature job: exact rows, incremental runs, Feast's point-in-time join on Delta, Feast's own CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from features.job import FeatureJob
from features.offline import FEATURE_TABLES
from features.repo import apply_definitions, render_repo
from features.spec import ENTITY_KEYS, STATS_ENTITIES, FeatureStoreSpec, stats_view
from tests.features.conftest import lake_config
from tests.features.events import START_MS, Reference, synthetic_events, write_events

REPO = Path(__file__).resolve().parents[2]


def read(job: FeatureJob, kind: str) -> pd.DataFrame:
    df = DeltaTable(job.table(kind)).to_pandas()
    key = ENTITY_KEYS["user" if kind == "sequence" else kind]
    return df.sort_values([key, "asof_ms"]).reset_index(drop=True)


def test_every_row_equals_the_event_by_event_reference(feature_lake):
    job, ref = FeatureJob(feature_lake.cfg), feature_lake.ref
    for entity in STATS_ENTITIES:
        rows = read(job, entity)
        assert len(rows) > 100
        assert not rows.duplicated([ENTITY_KEYS[entity], "asof_ms"]).any()
        for row in rows.itertuples():
            expected = ref.stats(entity, getattr(row, ENTITY_KEYS[entity]), row.asof_ms)
            assert np.array_equal(np.asarray(row.stats), expected), (entity, row)
        named = rows[list(feature_lake.spec.stat_names)].to_numpy(np.float64)
        assert np.array_equal(named, np.stack(rows["stats"].to_numpy()))
    seqs = read(job, "sequence")
    assert len(seqs) > 20 and seqs["item_ids"].map(len).max() == feature_lake.spec.sequence_length
    for row in seqs.itertuples():
        got = list(zip(row.item_ids, row.author_ids, row.actions, row.ts))
        assert got == ref.sequence(row.user_id, row.asof_ms)


def test_incremental_runs_equal_one_full_run_including_late_events(tmp_path, ray_local):
    events = synthetic_events(requests=200, seed=3)
    events.sort(key=lambda e: e["ts"])
    cut1, cut2 = len(events) // 3, 2 * len(events) // 3
    late = events[cut1 - 40: cut1]  # arrive with the third batch, though older than the second's events
    batches = [events[: cut1 - 40], events[cut1:cut2], events[cut2:] + late]

    inc = lake_config(tmp_path / "inc")
    job = FeatureJob(inc)
    for batch_no, batch in enumerate(batches, 1):
        write_events(inc.lake.events, batch, batch_no)
        report = job.run(materialize=False)
        assert not report.noop
        assert report.events_read < len(events)  # only the new range and the longest window before it
    assert job.run(materialize=False).noop  # nothing new in the log: nothing read, nothing written

    full = lake_config(tmp_path / "full")
    write_events(full.lake.events, events)
    FeatureJob(full).run(materialize=False)
    for kind in FEATURE_TABLES:
        a, b = read(job, kind), read(FeatureJob(full), kind)
        pd.testing.assert_frame_equal(a.drop(columns=["dt"]), b.drop(columns=["dt"]), check_like=True)

    # The late batch rewrote rows: their old files are still on disk but no longer in the Delta log.
    # A plain Parquet read of the folder would see both versions; Feast (DuckDB + delta) must not.
    table = job.table("item")
    on_disk = pq.ParquetDataset(table, partitioning="hive").read().num_rows
    assert on_disk > DeltaTable(table).to_pyarrow_table().num_rows
    store = apply_definitions(inc)
    check_point_in_time(store, Reference(FeatureStoreSpec.from_config(inc.features), events), job)


def test_an_event_leaving_the_longest_window_at_the_first_recomputed_boundary_gets_its_row(tmp_path, ray_local):
    """Run 2 starts at the boundary where run 1's oldest event leaves the 1 h window: that boundary needs
    the (all-zero) row, or the item's latest row keeps counting the event until the TTL ends."""
    def event(i: int, item: int, ts: int) -> dict:
        return {"event_id": f"x{i}", "ts": ts, "user_id": 1, "item_id": item, "author_id": item, "action": "impression"}

    minute = 60_000
    first, second = [event(0, 1, START_MS + 30_000), event(1, 2, START_MS + 60 * minute + 10_000)], \
        [event(2, 2, START_MS + 70 * minute)]
    overrides = ("features.windows_s=[300,3600]",)
    inc = lake_config(tmp_path / "inc", *overrides)
    job = FeatureJob(inc)
    for batch_no, batch in enumerate((first, second), 1):
        write_events(inc.lake.events, batch, batch_no)
        job.run(materialize=False)
    assert job.last_state().stats_k_hi >= START_MS // minute + 61
    full = lake_config(tmp_path / "full", *overrides)
    write_events(full.lake.events, first + second)
    FeatureJob(full).run(materialize=False)
    rows, expected = read(job, "item"), read(FeatureJob(full), "item")
    pd.testing.assert_frame_equal(rows.drop(columns=["dt"]), expected.drop(columns=["dt"]), check_like=True)
    latest = rows[rows["item_id"] == 1].iloc[-1]
    assert latest["asof_ms"] == START_MS + 61 * minute
    assert np.array_equal(np.asarray(latest["stats"]), job.spec.empty_stats())


def check_point_in_time(store, ref: Reference, job: FeatureJob) -> None:
    """Feast's get_historical_features == the reference at the last boundary at or before each time."""
    spec = ref.spec
    state = job.last_state()
    rng = np.random.default_rng(0)
    lo, hi = int(ref.ts.min()), state.stats_k_hi * spec.hop_ms
    times = np.r_[rng.integers(lo, hi, 150), np.arange(lo - lo % spec.hop_ms, hi, spec.hop_ms)[::7], lo - 1]
    for entity in ("item", "user"):
        key = ENTITY_KEYS[entity]
        ids = rng.choice(np.unique(ref.keys[key][ref.keys[key] > 0]), len(times))
        entity_df = pd.DataFrame({key: ids, "event_timestamp": pd.to_datetime(times, unit="ms", utc=True),
                                  "row": np.arange(len(times))})
        view = stats_view(entity)
        got = store.get_historical_features(entity_df=entity_df, full_feature_names=True, features=[
            f"{view}:stats", f"{view}:asof_ms", f"{view}_named:click_count_1h",
        ]).to_df().set_index("row").sort_index()
        got.columns = [c.split("__")[-1] if "named" not in c else "named_click_count_1h" for c in got.columns]
        click_1h = spec.stat_names.index("click_count_1h")
        assert len(got) == len(times)
        for i, (k, t) in enumerate(zip(ids, times)):
            expected = ref.stats(entity, int(k), int(t) // spec.hop_ms * spec.hop_ms)
            value = got["stats"].iloc[i]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                assert np.array_equal(expected, spec.empty_stats()), (entity, k, t)  # no row within the TTL
            else:
                assert np.array_equal(np.asarray(value), expected), (entity, k, t)
                assert got["asof_ms"].iloc[i] <= t
                assert got["named_click_count_1h"].iloc[i] == expected[click_1h]


def test_point_in_time_join_is_exact(feature_lake):
    store = apply_definitions(feature_lake.cfg)
    check_point_in_time(store, feature_lake.ref, FeatureJob(feature_lake.cfg))


def test_feast_cli_apply_and_materialize_incremental(tmp_path, ray_local):
    """Feast's documented workflow in the rendered repo folder: `feast apply`, `feast materialize-incremental`."""
    now_ms = int(time.time() * 1000)
    events = synthetic_events(requests=60, span_s=3 * 3600, start_ms=now_ms - 4 * 3600 * 1000, seed=5)
    cfg = lake_config(tmp_path)
    write_events(cfg.lake.events, events)
    FeatureJob(cfg).run(materialize=False)
    folder = render_repo(cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    feast = [sys.executable, "-c", "from feast.cli.cli import cli; cli()"]
    for args in (["apply"], ["materialize-incremental", pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S")]):
        done = subprocess.run([*feast, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    from features.online import OnlineFeatureClient

    client = OnlineFeatureClient(cfg)
    ref = Reference(FeatureStoreSpec.from_config(cfg.features), events)
    state = FeatureJob(cfg).last_state()
    t_hi = state.stats_k_hi * ref.spec.hop_ms
    items = sorted(set(ref.keys["item_id"].tolist()))
    got = client.get(events[0]["user_id"], items)
    expected = np.stack([ref.stats("item", i, t_hi) for i in items])
    assert not got.item_missing.any()
    assert np.array_equal(got.item_stats, expected)


def test_template_repo_matches_the_embedded_profile():
    import yaml

    import config
    from features.repo import PROJECT_ROOT, TEMPLATE_DIR, absolute_paths, feature_store_yaml

    rendered = feature_store_yaml(absolute_paths(config.load(), PROJECT_ROOT), TEMPLATE_DIR)
    assert yaml.safe_load((TEMPLATE_DIR / "feature_store.yaml").read_text()) == rendered
    cluster = feature_store_yaml(config.load("cluster"))
    assert cluster["online_store"]["type"] == "features.redis_store.GuardedRedisOnlineStore"
    assert cluster["offline_store"] == {"type": "duckdb"}


@pytest.mark.parametrize("bad", ["features.windows_s=[300,3601]", "features.sequence_actions=[jump]"])
def test_config_rejects_windows_off_the_hop_and_unknown_actions(bad):
    import config

    with pytest.raises(ValueError):
        FeatureStoreSpec.from_config(config.load(None, [bad]).features)


def test_events_without_the_optional_fields(tmp_path, ray_local):
    """MovieLens-like events: no author, no request id, `rate` with stars: stats and sequences still exact."""
    events = [{"event_id": f"m{i}", "ts": 1_767_571_200_000 + i * 37_000, "user_id": 1 + i % 3, "item_id": 1 + i % 7,
               "action": "rate", "value": float(1 + i % 5)} for i in range(120)]
    cfg = lake_config(tmp_path)
    write_events(cfg.lake.events, events)
    job = FeatureJob(cfg)
    job.run(materialize=False)
    ref = Reference(FeatureStoreSpec.from_config(cfg.features), events)
    for row in read(job, "item").itertuples():
        assert np.array_equal(np.asarray(row.stats), ref.stats("item", row.item_id, row.asof_ms))
    assert read(job, "author").empty
    assert pa.Table.from_pandas(read(job, "sequence")).num_rows > 0
