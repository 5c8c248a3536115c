"""bench.oracle_terms' estimators see only what was observable before each impression."""

from __future__ import annotations

import numpy as np

from bench.oracle_terms import history_affinity, window_counts


def _sim(t, user, item, clicked) -> dict[str, np.ndarray]:
    return {"t": np.array(t, float), "user": np.array(user), "item": np.array(item), "clicked": np.array(clicked)}


def test_window_counts_stop_at_the_last_hop_boundary_before_the_impression():
    # item 0 clicked at 10 s and 70 s, item 1 at 65 s; impressions at 119 s and 125 s.
    sim = _sim([10, 65, 70, 119, 125], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1], [True, True, True, False, False])
    # hop 60: the 119 s impression sees the counts as of 60 s (item 0: the click at 10 s), the 125 s one as of 120 s.
    assert window_counts(sim, 300, 60).tolist() == [0, 0, 1, 1, 1]
    assert window_counts(sim, 300, 60, clicks=False)[3:].tolist() == [1, 1]  # item 0 by 60 s, item 1 by 120 s
    # a 50 s window at the 120 s boundary holds the clicks from 70 s on: none of item 1's (65 s)
    assert window_counts(sim, 50, 60)[4] == 0


def test_history_affinity_averages_only_earlier_clicks_of_the_same_user():
    vec = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # user 0 clicks item 0 at t=1, then item 1 at t=2 (two impressions at t=2: the same request); user 1 never clicks
    sim = _sim([1, 2, 2, 3, 3], [0, 0, 0, 0, 1], [0, 1, 2, 2, 2], [True, True, False, False, False])
    est = history_affinity(sim, vec)
    # t=1: nothing earlier; t=2: item 0 only (not the same request's click); t=3: mean of items 0 and 1
    np.testing.assert_allclose(est, [0.0, 0.0, 0.6, 0.5 * 0.6 + 0.5 * 0.8, 0.0])
