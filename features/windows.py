"""Vectorised window arithmetic shared by the batch job, the sample builder and their tests (numpy only).

Windowed stats without a per-entity loop: events are summed per (entity, entry boundary), a running
sum is taken along the sorted (entity, boundary) order, and the sum of a window ending at boundary q
is `running(q) - running(q - window)`. Both look-ups are one `searchsorted` over composite codes
(entity rank * span + boundary), and the running sum of the previous entity cancels out of the
difference, so there is no special case at entity borders.

>>> import numpy as np
>>> keys, k = np.array([7, 7, 9]), np.array([1, 3, 2])
>>> m = np.array([[1], [1], [5]])
>>> out = window_metrics(keys, k, m, shifts=(2,), k_lo=1, k_hi=4)
>>> out.keys.tolist(), out.boundaries.tolist(), out.metrics[:, 0, 0].tolist()
([7, 7, 9, 9], [1, 3, 2, 4], [1, 1, 5, 0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

GroupSums = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class WindowMetrics:
    """The rows `window_metrics` found, plus the indices that map them back to their events."""

    keys: np.ndarray  # [m] entity ids
    boundaries: np.ndarray  # [m] boundary index k of each row
    metrics: np.ndarray  # [m, windows, metrics] int64 sums over each window ending at k (each (window, metric)
    #                      a contiguous row in memory: the stats table's columns are those rows)
    last_group: np.ndarray  # [m] index into the per-(entity, boundary) groups of the latest entry <= k
    group_first: np.ndarray  # [groups] index (into the sorted input) of each group's first event
    order: np.ndarray  # the input's sort order


def window_metrics(keys: np.ndarray, k_entry: np.ndarray, metrics: np.ndarray | GroupSums, shifts: tuple[int, ...],
                   k_lo: int, k_hi: int) -> WindowMetrics:
    """Rows at every boundary in [k_lo, k_hi] where some window of an entity changes.

    A window changes where an event enters (its entry boundary) or leaves it (entry + shift). For an
    exact row at k the input must hold every event entering in (k - max(shifts), k]; for every such row to
    exist, also those entering at k - max(shifts) (they leave at k).

    `metrics` is [n, metrics] per event, or a function (order, first) -> [groups, metrics] that sums the
    events `order` lists over the groups starting at `first` (a caller that can sum without building the
    per-event matrix: the batch job, `features.spec.grouped_event_metrics`).
    """
    order = np.lexsort((k_entry, keys))
    keys_s, k_s = keys[order], k_entry[order]
    n = len(keys_s)
    new_key = np.empty(n, bool)
    new_key[:1] = True
    np.not_equal(keys_s[1:], keys_s[:-1], out=new_key[1:])
    new_group = new_key.copy()
    new_group[1:] |= k_s[1:] != k_s[:-1]
    first = np.flatnonzero(new_group)
    sums = metrics(order, first) if callable(metrics) else np.add.reduceat(metrics[order], first, axis=0)
    n_metrics = sums.shape[1]
    if n == 0:
        none = np.zeros(0, np.int64)
        return WindowMetrics(keys_s, k_s, np.zeros((0, len(shifts), n_metrics), np.int64), none, none, order)
    g_k = k_s[first]
    g_rank = np.cumsum(new_key[first]) - 1  # the input is sorted by key: no np.unique (a second sort) needed
    # Metric-major from here on: every look-up and difference below reads and writes contiguous rows.
    running = np.zeros((n_metrics, len(first) + 1), np.int64)
    np.cumsum(sums.T, axis=1, out=running[:, 1:])

    k_min = int(g_k.min())
    span = int(g_k.max()) - k_min + max(shifts) + 3
    codes = g_rank * span + (g_k - k_min)
    # Candidate rows: each group's entry and exits. Every shifted copy of `codes` is sorted, so the
    # stable sort (a merge of sorted runs) costs little more than a copy.
    cand_k = np.concatenate([g_k] + [g_k + s for s in shifts])
    cands = np.concatenate([codes] + [codes + s for s in shifts])
    cands = np.sort(cands[(cand_k >= k_lo) & (cand_k <= k_hi)], kind="stable")
    distinct = np.empty(len(cands), bool)
    distinct[:1] = True
    np.not_equal(cands[1:], cands[:-1], out=distinct[1:])
    q_codes = cands[distinct]
    q_rank, q_rel = np.divmod(q_codes, span)

    at_q = np.searchsorted(codes, q_codes, side="right")
    latest = running.take(at_q, axis=1)
    out = np.empty((len(shifts), n_metrics, len(q_codes)), np.int64)
    for j, s in enumerate(shifts):
        rel = np.maximum(q_rel - s, -1)  # -1 sorts after every code of the previous entity
        np.subtract(latest, running.take(np.searchsorted(codes, q_rank * span + rel, side="right"), axis=1),
                    out=out[j])
    return WindowMetrics(keys_s[first[new_key[first]]][q_rank], q_rel + k_min, out.transpose(2, 0, 1), at_q - 1,
                         first, order)


def last_n_before(keys_sorted: np.ndarray, ts_sorted: np.ndarray, q_keys: np.ndarray, q_ts: np.ndarray,
                  n: int, strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For each query (key, t): [start, end) of the last `n` events of that key with ts < t (<= t if not strict).

    Input must be sorted by (key, ts). Keys absent from the input get empty ranges.

    >>> last_n_before(np.array([1, 1, 1, 2]), np.array([10, 20, 30, 5]), np.array([1, 1, 3]),
    ...               np.array([30, 99, 50]), n=2)
    (array([0, 1, 4]), array([2, 3, 4]))
    """
    if len(keys_sorted) == 0 or len(q_keys) == 0:
        zeros = np.zeros(len(q_keys), np.int64)
        return zeros, zeros
    key_first = np.searchsorted(keys_sorted, q_keys, side="left")
    key_end = np.searchsorted(keys_sorted, q_keys, side="right")
    t_min = min(int(ts_sorted.min()), int(q_ts.min())) - 1
    span = max(int(ts_sorted.max()), int(q_ts.max())) - t_min + 2
    uniq, rank = np.unique(keys_sorted, return_inverse=True)
    codes = rank * span + (ts_sorted - t_min)
    q_rank = np.minimum(np.searchsorted(uniq, q_keys), len(uniq) - 1)
    end = np.searchsorted(codes, q_rank * span + (q_ts - t_min), side="left" if strict else "right")
    end = np.clip(end, key_first, key_end)  # keys absent from the input: key_first == key_end
    return np.maximum(key_first, end - n), end


def list_array(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """A ListArray whose i-th list is values[starts[i]:ends[i]] (ranges may overlap).

    >>> list_array(np.array([5, 6, 7]), np.array([0, 1]), np.array([2, 3]), pa.int64()).to_pylist()
    [[5, 6], [6, 7]]
    """
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[flat], type_))
