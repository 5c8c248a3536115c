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

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class WindowMetrics:
    """The rows `window_metrics` found, plus the indices that map them back to their events."""

    keys: np.ndarray  # [m] entity ids
    boundaries: np.ndarray  # [m] boundary index k of each row
    metrics: np.ndarray  # [m, windows, metrics] int64 sums over each window ending at k
    last_group: np.ndarray  # [m] index into the per-(entity, boundary) groups of the latest entry <= k
    group_first: np.ndarray  # [groups] index (into the sorted input) of each group's first event
    order: np.ndarray  # the input's sort order


def window_metrics(keys: np.ndarray, k_entry: np.ndarray, metrics: np.ndarray, shifts: tuple[int, ...],
                   k_lo: int, k_hi: int) -> WindowMetrics:
    """Rows at every boundary in [k_lo, k_hi] where some window of an entity changes.

    A window changes where an event enters (its entry boundary) or leaves it (entry + shift). For an
    exact row at k the input must hold every event entering in (k - max(shifts), k].
    """
    order = np.lexsort((k_entry, keys))
    keys_s, k_s, m_s = keys[order], k_entry[order], metrics[order]
    n = len(keys_s)
    if n == 0:
        return WindowMetrics(keys_s, k_s, np.zeros((0, len(shifts), metrics.shape[1]), np.int64),
                             np.zeros(0, np.int64), np.zeros(0, np.int64), order)
    new_group = np.ones(n, bool)
    new_group[1:] = (keys_s[1:] != keys_s[:-1]) | (k_s[1:] != k_s[:-1])
    first = np.flatnonzero(new_group)
    g_keys, g_k = keys_s[first], k_s[first]
    running = np.zeros((len(first) + 1, metrics.shape[1]), np.int64)
    np.cumsum(np.add.reduceat(m_s, first, axis=0), axis=0, out=running[1:])

    uniq, g_rank = np.unique(g_keys, return_inverse=True)
    k_min = int(g_k.min())
    span = int(g_k.max()) - k_min + max(shifts) + 3
    codes = g_rank * span + (g_k - k_min)

    cand_rank = np.concatenate([g_rank] * (len(shifts) + 1))
    cand_k = np.concatenate([g_k] + [g_k + s for s in shifts])
    keep = (cand_k >= k_lo) & (cand_k <= k_hi)
    pairs = np.unique(np.stack([cand_rank[keep], cand_k[keep]], axis=1), axis=0)
    q_rank, q_k = pairs[:, 0], pairs[:, 1]

    def position(k: np.ndarray) -> np.ndarray:
        rel = np.maximum(k - k_min, -1)  # -1 sorts after every code of the previous entity
        return np.searchsorted(codes, q_rank * span + rel, side="right")

    at_q = position(q_k)
    out = np.stack([running[at_q] - running[position(q_k - s)] for s in shifts], axis=1)
    return WindowMetrics(uniq[q_rank], q_k, out, at_q - 1, first, order)


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
