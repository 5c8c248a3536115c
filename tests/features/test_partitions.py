"""The feature job's per-partition path (hash split -> window sums -> stats table) against a plain reference
on random events (hypothesis): every partition count gives the same rows, each equal to one mask over all events."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

import config
from features.partitions import SPLIT_COLUMNS, prepare_events, split_events, stats_partition
from features.spec import ENTITY_KEYS, STATS_ENTITIES, FeatureStoreSpec, event_metrics, grouped_event_metrics
from ingestion.contract import ACTIONS, TS_TYPE
from tests.features.events import START_MS, Reference

SPEC = FeatureStoreSpec.from_config(config.load(None, ["features.hop_s=60", "features.windows_s=[120,300]"]).features)
MINUTE = 60_000

events_strategy = st.lists(st.tuples(
    st.integers(1, 3),  # user
    st.integers(1, 4),  # item
    st.one_of(st.none(), st.integers(1, 2)),  # author (optional)
    st.integers(0, 12 * MINUTE),  # ts offset
    st.sampled_from(ACTIONS),
    st.one_of(st.none(), st.floats(0.5, 500.0)),  # value
), min_size=1, max_size=40)


def as_dicts(rows) -> list[dict]:
    return [{"user_id": u, "item_id": i, "author_id": a, "ts": START_MS + t, "action": action, "value": v}
            for u, i, a, t, action, v in rows]


def events_table(events: list[dict]) -> pa.Table:
    return pa.table({"user_id": [e["user_id"] for e in events], "item_id": [e["item_id"] for e in events],
                     "author_id": pa.array([e["author_id"] for e in events], pa.int64()),
                     "ts": pa.array([e["ts"] * 1000 for e in events], TS_TYPE),
                     "action": [e["action"] for e in events],
                     "value": pa.array([e["value"] for e in events], pa.float64())})


def changes(events: list[dict], entity: str, k_lo: int, k_hi: int) -> set[tuple[int, int]]:
    """(key, boundary) where an event of the key enters or leaves a window, within [k_lo, k_hi]."""
    out = set()
    for e in events:
        key = e[ENTITY_KEYS[entity]]
        if key is None:
            continue
        entry = e["ts"] // SPEC.hop_ms + 1
        out |= {(key, k) for k in (entry, *(entry + s for s in SPEC.window_hops)) if k_lo <= k <= k_hi}
    return out


@settings(max_examples=60, deadline=None)
@given(events_strategy, st.integers(0, 8), st.sampled_from([1, 2, 5]))
def test_partitioned_stats_equal_a_plain_reference(rows, k_lo_offset, partitions):
    events = as_dicts(rows)
    ref = Reference(SPEC, events)
    k_lo = START_MS // SPEC.hop_ms + k_lo_offset
    k_hi = k_lo + 12
    pieces = split_events(prepare_events(events_table(events)), STATS_ENTITIES, partitions)
    for i, entity in enumerate(STATS_ENTITIES):
        key = ENTITY_KEYS[entity]
        parts = pieces[i * partitions:(i + 1) * partitions]
        assert all(p.column_names == list(SPLIT_COLUMNS[entity]) for p in parts)
        owners = [set(p[key].to_pylist()) for p in parts]
        assert sum(len(o) for o in owners) == len(set().union(*owners))  # each key in one partition
        table = pa.concat_tables([stats_partition(p, entity, SPEC, k_lo, k_hi).table(SPEC, entity) for p in parts])
        got = {(r[key], r["asof_ms"] // SPEC.hop_ms): r for r in table.to_pylist()}
        assert len(got) == table.num_rows
        assert set(got) == changes(events, entity, k_lo, k_hi)
        for (k, boundary), row in got.items():
            expected = ref.stats(entity, k, boundary * SPEC.hop_ms)
            assert np.array_equal(np.asarray(row["stats"]), expected)
            assert [row[name] for name in SPEC.stat_names] == expected.tolist()
            assert row["dt"] == "2026-01-05"
            if entity == "item":
                latest = max(e["ts"] // SPEC.hop_ms + 1 for e in events
                             if e["item_id"] == k and e["ts"] // SPEC.hop_ms + 1 <= boundary)
                authors = [e["author_id"] or 0 for e in events
                           if e["item_id"] == k and e["ts"] // SPEC.hop_ms + 1 == latest]
                assert row["item_author_id"] == max(authors)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, len(ACTIONS)), st.one_of(st.just(float("nan")), st.floats(0, 1e6)),
                          st.integers(0, 4)), min_size=1, max_size=30))
def test_grouped_event_metrics_equal_summed_event_metrics(rows):
    codes = np.array([r[0] for r in rows], np.int8)
    values = np.array([r[1] for r in rows])
    groups = np.array([r[2] for r in rows])
    order = np.argsort(groups, kind="stable")
    first = np.flatnonzero(np.r_[True, groups[order][1:] != groups[order][:-1]])
    expected = np.add.reduceat(event_metrics(codes, values)[order], first, axis=0)
    assert np.array_equal(grouped_event_metrics(codes, values, order, first), expected)
