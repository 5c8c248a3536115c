"""The feature job's data movement on Ray: read the events once, cut them by entity hash, compute each
(table, partition) in a task, and hand the finished rows to the table's writer as they come.

Plain Ray tasks, not Ray Data: the job needs one all-to-all exchange (events -> entity partitions), and Ray
Data's operators for it (a repartition, a materialize, then a groupby shuffle per entity, each planned and
scheduled on its own) took most of the 42 s the job needed for 1M events on 2 cores. Here a run is one map
task per group of files and one task per (table, partition); on a cluster the same tasks spread over every
worker: more files make more map tasks, more events more partitions (`partition_count`). Each table is
written by the driver in one Delta commit, so the stats cross the object store as window sums, under half
the size of the table they become.

    split = EventSplit(dataset, lo_ms, hi_ms, ("item", "author", "user"), partitions)
    for rows in finished([stats_task(split, "item", p, spec, k_lo, k_hi) for p in range(partitions)]): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import ray

from features.partitions import (
    SPLIT_COLUMNS,
    StatsRows,
    prepare_events,
    sequence_partition,
    sequence_tokens,
    split_by_key,
    split_events,
    stats_partition,
)
from features.spec import FeatureStoreSpec
from ingestion.contract import TS_TYPE

# Events per partition at most (more events -> more partitions): a task's output (~350 bytes per event for
# items) stays ~20 MB, so that many fit in the object store while the writers catch up.
EVENTS_PER_PARTITION = 50_000
# Outputs per table started but not yet written: enough to keep every worker busy while a writer writes.
OUTPUTS_IN_FLIGHT = 2

Task = Callable[[], ray.ObjectRef]


def partition_count(configured: int, events: int) -> int:
    """`features.partitions`, or more when the events would make a task's output too large.

    >>> partition_count(4, 200_000), partition_count(4, 1_000_000)
    (4, 20)
    """
    return max(configured, -(-events // EVENTS_PER_PARTITION))


class EventSplit:
    """The events dated in [lo_ms, hi_ms), cut into `partitions` per entity by map tasks (started here): one per
    group of files and entity, each reading only its entity's columns, so that a single file still keeps
    every worker busy."""

    def __init__(self, dataset: pads.Dataset, lo_ms: int, hi_ms: int, entities: tuple[str, ...], partitions: int):
        self.partitions = partitions
        lo, hi = pa.scalar(lo_ms * 1000, TS_TYPE), pa.scalar(hi_ms * 1000, TS_TYPE)
        # The Delta dataset's fragments carry each file's statistics: files outside the range drop out here.
        fragments = list(dataset.get_fragments(filter=(pads.field("ts") >= lo) & (pads.field("ts") < hi)))
        groups = max(1, min(len(fragments), partitions))
        self._maps = {entity: [_split.options(num_returns=1 + partitions).remote(
            fragments[g::groups], dataset.schema, entity, lo_ms, hi_ms, partitions) for g in range(groups)]
            for entity in entities}

    def pieces(self, entity: str, part: int) -> list[ray.ObjectRef]:
        """Every map task's table of this entity partition."""
        return [refs[1 + part] for refs in self._maps[entity]]

    def events_read(self) -> int:
        return sum(ray.get([refs[0] for refs in next(iter(self._maps.values()))]))


@ray.remote
def _split(fragments: list, schema: pa.Schema, entity: str, lo_ms: int, hi_ms: int, partitions: int) -> list:
    ts = pads.field("ts")
    in_range = (ts >= pa.scalar(lo_ms * 1000, TS_TYPE)) & (ts < pa.scalar(hi_ms * 1000, TS_TYPE))
    columns = [c for c in SPLIT_COLUMNS[entity] if c != "ts_ms"] + ["ts"]
    tables = [f.to_table(schema=schema, columns=columns, filter=in_range) for f in fragments]
    events = prepare_events(pa.concat_tables(tables) if tables else schema.empty_table().select(columns))
    return [events.num_rows, *split_events(events, (entity,), partitions)]


@ray.remote
def _stats_rows(entity: str, spec: FeatureStoreSpec, k_lo: int, k_hi: int, *pieces: pa.Table) -> StatsRows:
    return stats_partition(pa.concat_tables(pieces), entity, spec, k_lo, k_hi)


@ray.remote
def _sequence_rows(spec: FeatureStoreSpec, k_lo: int, k_hi: int, prior: pa.Table, *pieces: pa.Table) -> pa.Table:
    fresh = sequence_tokens(pa.concat_tables(pieces), spec, (k_lo - 1) * spec.sequence_hop_ms,
                            k_hi * spec.sequence_hop_ms)
    return sequence_partition(pa.concat_tables([fresh, prior]), spec, k_lo, k_hi)


def stats_task(split: EventSplit, entity: str, part: int, spec: FeatureStoreSpec, k_lo: int, k_hi: int) -> Task:
    """Starts the task of one stats partition: rows at boundaries [k_lo, k_hi]."""
    return lambda: _stats_rows.remote(entity, spec, k_lo, k_hi, *split.pieces(entity, part))


def sequence_tasks(split: EventSplit, prior: pa.Table, spec: FeatureStoreSpec, k_lo: int, k_hi: int) -> list[Task]:
    """Starts the tasks of the sequence partitions; `prior` (TOKEN_SCHEMA) holds each active user's last
    snapshot's tokens."""
    priors = [ray.put(t) for t in split_by_key(prior, "user_id", split.partitions)]
    return [(lambda part=part: _sequence_rows.remote(spec, k_lo, k_hi, priors[part], *split.pieces("user", part)))
            for part in range(split.partitions)]


def finished(tasks: Iterable[Task], in_flight: int = OUTPUTS_IN_FLIGHT) -> Iterator:
    """Start `tasks` and yield their outputs in the order they finish, with at most `in_flight` started
    and not yet taken (the object store holds only those, whatever the number of tasks)."""
    pending = list(tasks)[::-1]
    running = [pending.pop()() for _ in range(min(in_flight, len(pending)))]
    while running:
        done, running = ray.wait(running, num_returns=1)
        output = ray.get(done[0])
        if pending:
            running.append(pending.pop()())
        yield output
