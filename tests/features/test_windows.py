"""The window arithmetic against plain loops, on random inputs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

import config
from features.spec import FeatureStoreSpec, event_metrics, window_label
from features.windows import last_n_before, list_array, window_metrics
from ingestion.contract import ACTION_INDEX

entries = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 30), st.integers(0, 4)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(entries, st.integers(0, 20), st.integers(0, 45), st.sampled_from([(1,), (2, 5), (3, 7, 12)]))
def test_window_metrics_equals_loops(rows, k_lo, span, shifts):
    k_hi = k_lo + span
    keys = np.array([r[0] for r in rows], np.int64)
    ks = np.array([r[1] for r in rows], np.int64)
    m = np.array([[r[2], 1] for r in rows], np.int64).reshape(-1, 2)
    out = window_metrics(keys, ks, m, shifts, k_lo, k_hi)

    def expected(key, k):
        return np.stack([m[(keys == key) & (ks > k - s) & (ks <= k)].sum(axis=0) for s in shifts])

    got = {(int(a), int(b)): out.metrics[i] for i, (a, b) in enumerate(zip(out.keys, out.boundaries))}
    assert len(got) == len(out.keys)  # one row per (entity, boundary)
    for (key, k), value in got.items():
        assert k_lo <= k <= k_hi
        assert np.array_equal(value, expected(key, k))
    # Every boundary where some window changes has a row (so the latest row is always current).
    for key in set(keys.tolist()):
        for k in range(k_lo, k_hi + 1):
            if not np.array_equal(expected(key, k), expected(key, k - 1)):
                assert (key, k) in got


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 20)), max_size=30),
       st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 22)), min_size=1, max_size=10), st.integers(1, 4))
def test_last_n_before_equals_loops(events, queries, n):
    events = sorted(events)
    keys = np.array([e[0] for e in events], np.int64)
    ts = np.array([e[1] for e in events], np.int64)
    qk = np.array([q[0] for q in queries], np.int64)
    qt = np.array([q[1] for q in queries], np.int64)
    starts, ends = last_n_before(keys, ts, qk, qt, n)
    for i, (key, t) in enumerate(queries):
        before = [j for j, e in enumerate(events) if e[0] == key and e[1] < t][-n:]
        assert list(range(starts[i], ends[i])) == before


def test_list_array_and_labels():
    lists = list_array(np.array([1, 2, 3]), np.array([0, 2, 1]), np.array([2, 2, 3]), pa.int64())
    assert lists.to_pylist() == [[1, 2], [], [2, 3]]
    assert [window_label(s) for s in (300, 3600, 86400, 604800, 2592000, 45)] == ["5m", "1h", "24h", "7d", "30d", "45s"]


def test_stats_vector_layout_and_rates():
    spec = FeatureStoreSpec.from_config(config.load(None, ["features.windows_s=[86400,604800,2592000]",
                                                      "features.hop_s=3600"]).features)
    assert spec.window_labels == ("24h", "7d", "30d")
    codes = np.array([ACTION_INDEX[a] for a in ("impression", "impression", "click", "like", "view", "rate")])
    values = np.array([np.nan, np.nan, np.nan, np.nan, 42.5, 4.0])
    per_event = event_metrics(codes, values)
    stats = spec.stats_vectors(np.repeat(per_event.sum(axis=0)[None, None], 3, axis=1))[0]
    named = dict(zip(spec.stat_names, stats))
    assert named["impression_count_7d"] == 2
    assert named["view_value_sum_30d"] == 42.5 and named["rate_value_sum_24h"] == 4
    k = spec.prior_strength
    assert named["ctr_24h"] == (1 + k * spec.ctr_prior) / (2 + k)
    assert named["ltr_24h"] == (1 + k * spec.ltr_prior) / (2 + k)
    normalised = spec.normalise(stats)
    assert normalised[spec.stat_names.index("impression_count_24h")] == np.float32(np.log1p(2))
    assert normalised[spec.stat_names.index("ctr_24h")] == np.float32(named["ctr_24h"])
