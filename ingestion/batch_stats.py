"""Exact statistics of a batch's `events` rows, computed per landing file where the file is parsed and merged.

The GX gate (`ingestion.expectations`) validates one row of statistics per batch. Every statistic is a count,
a minimum or a maximum, so each parse task computes them over the rows it writes (`file_statistics`, Arrow
kernels, no GX import in the worker) and the driver merges the files' dictionaries (`batch_statistics`): the
merged row equals what the same code computes over the whole batch at once (a test holds them equal). The one
statistic that spans files, repeated event_ids, is counted by the driver over the batch's kept ids
(`repeated_ids`, over the hashes the parse tasks sorted).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from ingestion.contract import ACTIONS, DEFAULT_VALUE_RANGE, REQUIRED_FIELDS, VALUE_RANGES

POSITIVE_ID_FIELDS = ("user_id", "item_id", "author_id")
if TYPE_CHECKING:  # parse tasks import this module: no pydantic models, no pandas there (0.35 s per cold worker)
    from config.schema import IngestConfig
    from ingestion.dedup import SortedHashes

_NULLABLE = ("author_id", "request_id", "value")  # optional contract fields (their null rates may be bounded)


def value_groups() -> dict[str, tuple[float, float]]:
    """Value bounds per action with its own range, and one group ("other") for the rest."""
    return {**{a: (r.low, r.high) for a, r in VALUE_RANGES.items()}, "other": (DEFAULT_VALUE_RANGE.low,
                                                                              DEFAULT_VALUE_RANGE.high)}


def scalar(value: pa.Scalar):
    """An Arrow scalar as Python, None when null (an aggregate over no values)."""
    return value.as_py() if value.is_valid else None


def file_statistics(rows: pa.Table) -> dict:
    """Counts, minima and maxima over `events` rows (`ts` a timestamp): what `batch_statistics` merges."""
    ts = pc.min_max(rows["ts"].cast(pa.int64()))
    eid_chars = pc.min_max(pc.utf8_length(rows["event_id"]))
    actions, counts = pc.value_counts(rows["action"]).flatten()
    ranged = pa.array(list(VALUE_RANGES))
    group = pc.if_else(pc.is_in(rows["action"], value_set=ranged), rows["action"], "other")
    by_group = pa.table({"group": group, "value": rows["value"]}).group_by("group", use_threads=False) \
        .aggregate([("value", "min"), ("value", "max")])
    value = rows["value"]
    return {
        "rows": rows.num_rows,
        "nulls": {name: rows[name].null_count for name in (*REQUIRED_FIELDS, *_NULLABLE)},
        "min_ids": {name: scalar(pc.min(rows[name])) for name in POSITIVE_ID_FIELDS},
        "ts_us": (scalar(ts["min"]), scalar(ts["max"])),
        "event_id_chars": (scalar(eid_chars["min"]), scalar(eid_chars["max"])),
        "max_request_id_chars": scalar(pc.max(pc.utf8_length(rows["request_id"]))),
        "actions": dict(zip(actions.to_pylist(), counts.to_pylist())),
        "non_finite_values": rows.num_rows - value.null_count - pc.sum(pc.is_finite(value), min_count=0).as_py(),
        "values": {g: (lo, hi) for g, lo, hi in zip(*(by_group[c].to_pylist()
                                                     for c in ("group", "value_min", "value_max")))},
    }


def _least(values):
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _most(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def batch_statistics(parts: list[dict], repeated_event_ids: int, cfg: IngestConfig) -> dict[str, float | None]:
    """The gate's statistics from the `file_statistics` of a batch's files (ts in ms, as the contract has it).

    >>> from ingestion.staging import to_events
    >>> rows = pa.table({"event_id": ["a", "b"], "ts": [1, 2], "user_id": [1, 2], "item_id": [3, 4],
    ...                  "author_id": [None, 5], "request_id": ["r", None], "action": ["click", "gift"],
    ...                  "value": [None, 2.0], "source_file": ["f", "f"], "source_offset": [0, 9]})
    >>> parts = [file_statistics(to_events(rows.slice(i, 1), batch_no=1)) for i in range(2)]
    >>> from config.schema import IngestConfig
    >>> stats = batch_statistics(parts, 0, IngestConfig())
    >>> [stats[k] for k in ("rows", "min_author_id", "max_ts", "max_value_gift", "nulls_user_id")]
    [2, 5, 2.0, 2.0, 0]
    >>> stats["min_value_view"], stats["max_value_other"]  # no view; "other": actions without their own range
    (None, None)
    """
    n = sum(p["rows"] for p in parts)
    stats: dict[str, float | int | None] = {"rows": n}
    for name in REQUIRED_FIELDS:
        stats[f"nulls_{name}"] = sum(p["nulls"][name] for p in parts)
    for name in POSITIVE_ID_FIELDS:
        stats[f"min_{name}"] = _least(p["min_ids"][name] for p in parts)
    low, high = _least(p["ts_us"][0] for p in parts), _most(p["ts_us"][1] for p in parts)
    stats["min_ts"] = None if low is None else low / 1000  # the contract's bounds are in ms
    stats["max_ts"] = None if high is None else high / 1000
    stats["min_event_id_chars"] = _least(p["event_id_chars"][0] for p in parts)
    stats["max_event_id_chars"] = _most(p["event_id_chars"][1] for p in parts)
    stats["max_request_id_chars"] = _most(p["max_request_id_chars"] for p in parts)
    stats["repeated_event_ids"] = repeated_event_ids
    counts: dict[str, int] = {}
    for p in parts:
        for action, c in p["actions"].items():
            counts[action] = counts.get(action, 0) + c
    stats["unknown_action_rows"] = sum(c for a, c in counts.items() if a not in ACTIONS)
    stats["non_finite_values"] = sum(p["non_finite_values"] for p in parts)
    for group in value_groups():
        found = [p["values"].get(group, (None, None)) for p in parts]
        stats[f"min_value_{group}"] = _least(lo for lo, _ in found)
        stats[f"max_value_{group}"] = _most(hi for _, hi in found)
    rates = n >= cfg.batch_rules.min_rows_for_rates
    for name in sorted(cfg.batch_rules.max_null_rate):
        stats[f"null_rate_{name}"] = sum(p["nulls"][name] for p in parts) / n if rates else None
    for action in sorted(cfg.batch_rules.action_share_bounds):
        stats[f"share_{action}"] = counts.get(action, 0) / n if rates else None
    return stats


def repeated_ids(ids: pa.ChunkedArray | pa.Array, keys: SortedHashes) -> int:
    """How many of `ids` repeat an earlier one; `keys` are their `dedup.hash_ids`, sorted.

    Equal ids hash equally, so ids whose hash is unique are unique; only rows sharing a hash are compared.

    >>> import numpy as np
    >>> from ingestion.dedup import SortedHashes, hash_ids
    >>> ids = pa.array(["a", "b", "a", "c", "a"])
    >>> repeated_ids(ids, SortedHashes(hash_ids(ids)))
    2
    >>> repeated_ids(ids, SortedHashes(np.zeros(5, np.uint64)))  # every hash colliding
    2
    """
    suspects = keys.sharing()
    if not suspects.size:
        return 0
    picked = ids.take(pa.array(suspects))
    return len(picked) - len(pc.unique(picked))
