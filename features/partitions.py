"""Per-partition work of the feature job (each call gets whole entities: every event of the ids it holds).

Plain functions of Arrow tables so that Ray Data can ship them to workers and tests can call them directly.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.offline import SEQUENCE_SCHEMA, day_strings, stats_schema
from features.spec import ENTITY_KEYS, FeatureSpec, event_metrics
from features.windows import last_n_before, list_array, window_metrics
from ingestion.contract import ACTION_INDEX, ACTIONS, TS_TYPE

_ACTION_NAMES = pa.array(ACTIONS)
_ACTION_CODES = pa.array(range(1, len(ACTIONS) + 1), pa.int8())
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def prepare_events(batch: pa.Table) -> pa.Table:
    """Contract rows -> compact columns: ts as epoch ms (int64), action as its ACTION_INDEX code (int8)."""
    out = {name: batch[name] for name in ("user_id", "item_id", "author_id") if name in batch.column_names}
    out["ts_ms"] = pc.divide(pc.cast(batch["ts"], pa.int64()), 1000)
    out["action"] = pc.take(_ACTION_CODES, pc.index_in(batch["action"], value_set=_ACTION_NAMES))
    if "value" in batch.column_names:
        out["value"] = batch["value"]
    return pa.table(out)


def with_partition(batch: pa.Table, key: str, partitions: int) -> pa.Table:
    """Add `part`: a hash of the key (multiplicative, so sequential ids spread evenly) modulo `partitions`."""
    keys = batch[key].to_numpy(zero_copy_only=False).astype(np.uint64)
    part = ((keys * _GOLDEN) >> np.uint64(40)) % np.uint64(partitions)
    return batch.append_column("part", pa.array(part.astype(np.int32)))


def stats_partition(batch: pa.Table, entity: str, spec: FeatureSpec, k_lo: int, k_hi: int) -> pa.Table:
    """Stats rows at boundaries [k_lo, k_hi] for the entities in `batch` (see `features.spec`)."""
    key = ENTITY_KEYS[entity]
    batch = batch.filter(pc.is_valid(batch[key]))
    keys = batch[key].to_numpy()
    ts = batch["ts_ms"].to_numpy()
    values = batch["value"].to_numpy(zero_copy_only=False).astype(np.float64)
    metrics = event_metrics(batch["action"].to_numpy(), values)
    wm = window_metrics(keys, ts // spec.hop_ms + 1, metrics, spec.window_hops, k_lo, k_hi)
    return stats_table(spec, entity, wm.keys, wm.boundaries * spec.hop_ms, wm.metrics,
                       _item_authors(batch, wm) if entity == "item" else None)


def _item_authors(batch: pa.Table, wm) -> np.ndarray:
    """Each row's item author: the largest author id among the events of the row's latest entry group."""
    authors = batch["author_id"].fill_null(0).to_numpy()[wm.order]
    if len(authors) == 0:
        return np.zeros(0, np.int64)
    per_group = np.maximum.reduceat(authors, wm.group_first)
    return per_group[wm.last_group]


def stats_table(spec: FeatureSpec, entity: str, keys: np.ndarray, asof_ms: np.ndarray, window_metrics: np.ndarray,
                item_authors: np.ndarray | None = None) -> pa.Table:
    """Rows of an entity's stats table from [n, windows, metrics] sums (shared with the real-time path)."""
    schema = stats_schema(spec, entity)
    stats = spec.stats_vectors(window_metrics)
    n, width = stats.shape
    asof = pa.array(np.asarray(asof_ms, np.int64))
    cols: dict[str, pa.Array] = {
        ENTITY_KEYS[entity]: pa.array(np.asarray(keys, np.int64)),
        "event_timestamp": pc.cast(pc.multiply(asof, 1000), TS_TYPE),
        "asof_ms": asof,
    }
    if entity == "item":
        cols["item_author_id"] = pa.array(np.asarray(item_authors, np.int64))
    n_metrics = window_metrics.shape[2]
    flat_metrics = window_metrics.reshape(n, window_metrics.shape[1] * n_metrics)
    for i, name in enumerate(spec.stat_names):
        window, j = divmod(i, n_metrics + 2)
        exact_count = schema.field(name).type == pa.int64()
        cols[name] = pa.array(flat_metrics[:, window * n_metrics + j] if exact_count else stats[:, i])
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    cols["stats"] = pa.ListArray.from_arrays(offsets, pa.array(stats.reshape(-1)))
    cols["dt"] = day_strings(asof)
    return pa.table(cols, schema=schema)


def sequence_partition(batch: pa.Table, spec: FeatureSpec, k_lo: int, k_hi: int) -> pa.Table:
    """Snapshots at sequence boundaries [k_lo, k_hi] where the user had engagements in the hop before.

    `batch` holds the users' engagements from boundary k_lo - 1 on plus, as earlier tokens, their last
    snapshot before that (it holds every engagement before it that a snapshot keeps).
    """
    users, ts = batch["user_id"].to_numpy(), batch["ts_ms"].to_numpy()
    items, actions = batch["item_id"].to_numpy(), batch["action"].to_numpy().astype(np.int64)
    authors = batch["author_id"].fill_null(0).to_numpy()
    order = np.lexsort((actions, items, ts, users))
    users, ts, items, actions, authors = users[order], ts[order], items[order], actions[order], authors[order]
    hop = spec.sequence_hop_ms
    k = ts // hop + 1
    fresh = (k >= k_lo) & (k <= k_hi)
    snaps = np.unique(np.stack([users[fresh], k[fresh]], axis=1), axis=0).reshape(-1, 2)
    q_users, q_ms = snaps[:, 0], snaps[:, 1] * hop
    starts, ends = last_n_before(users, ts, q_users, q_ms, spec.sequence_length)
    asof = pa.array(q_ms)
    return pa.table({
        "user_id": pa.array(q_users), "event_timestamp": pc.cast(pc.multiply(asof, 1000), TS_TYPE),
        "asof_ms": asof,
        "item_ids": list_array(items, starts, ends, pa.int64()),
        "author_ids": list_array(authors, starts, ends, pa.int64()),
        "actions": list_array(actions, starts, ends, pa.int64()),
        "ts": list_array(ts, starts, ends, pa.int64()),
        "dt": day_strings(asof),
    }, schema=SEQUENCE_SCHEMA)


def engagement_filter(spec: FeatureSpec) -> pa.Array:
    """The action names that become sequence tokens (for pushing the filter into the Delta read)."""
    names = {code: name for name, code in ACTION_INDEX.items()}
    return pa.array([names[c] for c in spec.sequence_actions])
