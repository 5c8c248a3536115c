"""Per-partition work of the feature job: cutting events by entity hash, and turning one hash partition
(every event of the ids it holds) into feature rows.

Plain functions of Arrow tables so that the job's Ray tasks (`features.shuffle`) can run them on workers and
tests can call them directly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.offline import SEQUENCE_SCHEMA, stats_schema
from features.spec import ENTITY_KEYS, FeatureStoreSpec, grouped_event_metrics
from features.windows import last_n_before, list_array, window_metrics
from ingestion.contract import ACTION_INDEX, ACTIONS, TS_TYPE, day_strings

_ACTION_NAMES = pa.array(ACTIONS)
_ACTION_CODES = pa.array(range(1, len(ACTIONS) + 1), pa.int8())
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

# The columns each entity's partitions carry: what its rows need, nothing more (user partitions also feed sequences).
SPLIT_COLUMNS: dict[str, tuple[str, ...]] = {
    "item": ("item_id", "author_id", "ts_ms", "action", "value"),
    "author": ("author_id", "ts_ms", "action", "value"),
    "user": ("user_id", "item_id", "author_id", "ts_ms", "action", "value"),
}
# Rows of the sequence computation's input: one engagement (or earlier token) each.
TOKEN_SCHEMA = pa.schema([pa.field(n, pa.int64()) for n in ("user_id", "item_id", "author_id", "ts_ms")]
                         + [pa.field("action", pa.int8())])


def prepare_events(batch: pa.Table) -> pa.Table:
    """Contract rows -> compact columns: ts as epoch ms (int64), action as its ACTION_INDEX code (int8)."""
    out = {name: batch[name] for name in ("user_id", "item_id", "author_id") if name in batch.column_names}
    out["ts_ms"] = pc.divide(pc.cast(batch["ts"], pa.int64()), 1000)
    out["action"] = pc.take(_ACTION_CODES, pc.index_in(batch["action"], value_set=_ACTION_NAMES))
    if "value" in batch.column_names:
        out["value"] = batch["value"]
    return pa.table(out)


def partition_ids(keys: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """A hash of each key (multiplicative, so sequential ids spread evenly) modulo `partitions`."""
    hashed = keys.to_numpy(zero_copy_only=False).astype(np.uint64) * _GOLDEN
    return (hashed >> np.uint64(40)) % np.uint64(partitions)


def with_partition(batch: pa.Table, key: str, partitions: int) -> pa.Table:
    """Add `part`: the partition of each row's key (`partition_ids`)."""
    return batch.append_column("part", pa.array(partition_ids(batch[key], partitions).astype(np.int32)))


def split_by_key(table: pa.Table, key: str, partitions: int) -> list[pa.Table]:
    """`partitions` tables: the rows of `table` whose key hashes to each (rows without a key are dropped)."""
    if table[key].null_count:
        table = table.filter(pc.is_valid(table[key]))
    # A small integer type makes the stable argsort a radix sort.
    part = partition_ids(table[key], partitions).astype(np.min_scalar_type(partitions))
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    # One take per partition rather than slices of one sorted table: pickling a slice ships its parent's buffers.
    return [table.take(order[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def split_events(events: pa.Table, entities: tuple[str, ...], partitions: int) -> list[pa.Table]:
    """Prepared events -> for each entity in turn, its `partitions` tables (`split_by_key`, `SPLIT_COLUMNS`)."""
    return [piece for entity in entities
            for piece in split_by_key(events.select(list(SPLIT_COLUMNS[entity])), ENTITY_KEYS[entity], partitions)]


@dataclass
class StatsRows:
    """One stats partition's rows before they become a table: what a task hands to the table's writer
    (plain arrays, under half the size of the table they make)."""

    keys: np.ndarray  # [m] entity ids
    asof_ms: np.ndarray  # [m]
    sums: np.ndarray  # [windows, N_METRICS, m] int64 window sums, one contiguous row per (window, metric)
    item_authors: np.ndarray | None  # [m] for items

    def table(self, spec: FeatureStoreSpec, entity: str) -> pa.Table:
        return stats_table(spec, entity, self.keys, self.asof_ms, self.sums.transpose(2, 0, 1), self.item_authors)


def stats_partition(batch: pa.Table, entity: str, spec: FeatureStoreSpec, k_lo: int, k_hi: int) -> StatsRows:
    """Stats rows at boundaries [k_lo, k_hi] for the entities in `batch` (see `features.spec`)."""
    key = ENTITY_KEYS[entity]
    batch = batch.filter(pc.is_valid(batch[key]))
    keys = batch[key].to_numpy()
    ts = batch["ts_ms"].to_numpy()
    codes, values = batch["action"].to_numpy(), batch["value"].to_numpy(zero_copy_only=False)
    wm = window_metrics(keys, ts // spec.hop_ms + 1, partial(grouped_event_metrics, codes, values), spec.window_hops,
                        k_lo, k_hi)
    return StatsRows(wm.keys, wm.boundaries * spec.hop_ms, wm.metrics.transpose(1, 2, 0),
                     _item_authors(batch, wm) if entity == "item" else None)


def _item_authors(batch: pa.Table, wm) -> np.ndarray:
    """Each row's item author: the largest author id among the events of the row's latest entry group."""
    authors = batch["author_id"].fill_null(0).to_numpy()[wm.order]
    if len(authors) == 0:
        return np.zeros(0, np.int64)
    per_group = np.maximum.reduceat(authors, wm.group_first)
    return per_group[wm.last_group]


def stats_table(spec: FeatureStoreSpec, entity: str, keys: np.ndarray, asof_ms: np.ndarray, window_metrics: np.ndarray,
                item_authors: np.ndarray | None = None) -> pa.Table:
    """Rows of an entity's stats table from [n, windows, metrics] sums (shared with the real-time path)."""
    schema = stats_schema(spec, entity)
    stats = spec.stats_vectors(window_metrics)
    n, width = stats.shape
    asof = np.asarray(asof_ms, np.int64)
    cols: dict[str, pa.Array] = {
        ENTITY_KEYS[entity]: pa.array(np.asarray(keys, np.int64)),
        "event_timestamp": pa.array(asof * 1000, TS_TYPE),
        "asof_ms": pa.array(asof),
    }
    if entity == "item":
        cols["item_author_id"] = pa.array(np.asarray(item_authors, np.int64))
    # Columns are contiguous rows of the transposes (copies only where the input is stored row by row, as in
    # the real-time path); a strided column would convert slowly.
    n_windows, n_metrics = window_metrics.shape[1:]
    by_stat = np.ascontiguousarray(stats.T)
    by_metric = np.ascontiguousarray(window_metrics.reshape(n, n_windows * n_metrics).T)
    for i, name in enumerate(spec.stat_names):
        window, j = divmod(i, n_metrics + 2)
        exact_count = schema.field(name).type == pa.int64()
        cols[name] = pa.array(by_metric[window * n_metrics + j] if exact_count else by_stat[i])
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    cols["stats"] = pa.ListArray.from_arrays(offsets, pa.array(stats.reshape(-1)))
    cols["dt"] = day_strings(asof)
    return pa.table(cols, schema=schema)


def sequence_tokens(events: pa.Table, spec: FeatureStoreSpec, lo_ms: int, hi_ms: int) -> pa.Table:
    """The engagements (`spec.sequence_actions`) among `events` dated in [lo_ms, hi_ms), as TOKEN_SCHEMA rows."""
    ts = events["ts_ms"]
    keep = pc.and_(pc.and_(pc.greater_equal(ts, lo_ms), pc.less(ts, hi_ms)),
                   pc.is_in(events["action"], value_set=pa.array(spec.sequence_actions, pa.int8())))
    return events.filter(keep).select(TOKEN_SCHEMA.names).cast(TOKEN_SCHEMA)


def sequence_partition(batch: pa.Table, spec: FeatureStoreSpec, k_lo: int, k_hi: int) -> pa.Table:
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
        "dt": day_strings(q_ms),
    }, schema=SEQUENCE_SCHEMA)


def engagement_filter(spec: FeatureStoreSpec) -> pa.Array:
    """The action names that become sequence tokens (for pushing the filter into a read)."""
    names = {code: name for name, code in ACTION_INDEX.items()}
    return pa.array([names[c] for c in spec.sequence_actions])
