"""The interaction-event contract (docs/design.md, "Interaction event"): one place for it.

Everything that reads, writes or checks events imports from here: the Arrow schemas of the
`events` and `events_quarantine` Delta tables, the action vocabulary, and the row rules as
data (`ROW_RULES`) so that the parser, the Great Expectations suite and the serving API agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

# Order matters: the index (from 1, 0 = padding) is the action id models see.
ACTIONS: tuple[str, ...] = (
    "impression", "click", "view", "like", "comment", "share", "follow", "gift", "rate",
)
ACTION_INDEX: dict[str, int] = {a: i + 1 for i, a in enumerate(ACTIONS)}

REQUIRED_FIELDS: tuple[str, ...] = ("event_id", "ts", "user_id", "item_id", "action")
OPTIONAL_FIELDS: tuple[str, ...] = ("author_id", "request_id", "value")
ID_FIELDS: tuple[str, ...] = ("user_id", "item_id")  # required, > 0
MAX_EVENT_ID_CHARS = 128
MAX_REQUEST_ID_CHARS = 128
MAX_LINE_BYTES = 1 << 20  # 1 MiB: a longer line is quarantined unparsed

# The JSON shape of one event, as parsed from a log line.
RAW_EVENT_SCHEMA = pa.schema([
    pa.field("event_id", pa.string()),
    pa.field("ts", pa.int64()),
    pa.field("user_id", pa.int64()),
    pa.field("item_id", pa.int64()),
    pa.field("author_id", pa.int64()),
    pa.field("request_id", pa.string()),
    pa.field("action", pa.string()),
    pa.field("value", pa.float64()),
])

TS_TYPE = pa.timestamp("us", tz="UTC")

# The `events` Delta table: the contract's fields, event time as microsecond UTC timestamps,
# the date partition, and lineage (which ingestion batch, file and byte offset each row came from).
EVENTS_SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("ts", TS_TYPE, nullable=False),
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("author_id", pa.int64()),
    pa.field("request_id", pa.string()),
    pa.field("action", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
    pa.field("dt", pa.string(), nullable=False),
    pa.field("ingest_batch", pa.int64(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
])
EVENTS_PARTITION_BY = ["dt"]

# The `events_quarantine` Delta table: the raw bytes of every rejected line (nothing is lost,
# even non-UTF-8 input), where it came from and why it was rejected.
QUARANTINE_SCHEMA = pa.schema([
    pa.field("raw", pa.large_binary(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
    pa.field("line_no", pa.int64(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("ingest_batch", pa.int64(), nullable=False),
    pa.field("ingested_at", TS_TYPE, nullable=False),
])


def day_strings(ms) -> pa.Array:
    """Epoch milliseconds -> 'YYYY-MM-DD' (UTC), the `dt` partition.

    >>> day_strings([0, 86_400_000 * 366 + 5, -1]).to_pylist()
    ['1970-01-01', '1971-01-02', '1969-12-31']
    """
    # Formats each day once and gathers: formatting every row took longer than computing the row.
    days = np.asarray(ms, np.int64) // 86_400_000
    if len(days) == 0:
        return pa.array([], pa.string())
    first = int(days.min())
    labels = np.arange(first, int(days.max()) + 1).astype("datetime64[D]").astype(str)
    return pa.array(labels, pa.string()).take(pa.array(days - first))


@dataclass(frozen=True)
class EventTimeBounds:
    """Event times outside [min_ts_ms, now + max_future_ms] are rejected.

    The defaults are `config.schema.IngestConfig`'s; stages build their bounds with `from_config`.
    """

    min_ts_ms: int = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1000)
    # Clocks drift by seconds, not hours: an event further ahead is forged or from a broken clock.
    max_future_ms: int = 300 * 1000

    @classmethod
    def from_config(cls, ingest) -> EventTimeBounds:
        """The bounds of an `IngestConfig` (`min_event_time`, `max_future_s`)."""
        min_ts = datetime.fromisoformat(ingest.min_event_time.replace("Z", "+00:00"))
        return cls(min_ts_ms=int(min_ts.timestamp() * 1000), max_future_ms=int(ingest.max_future_s * 1000))


@dataclass(frozen=True)
class ValueRange:
    low: float
    high: float


# Allowed `value` per action (choice: generous physical bounds; tighter checks belong to the
# batch-level expectations, which see distributions).
VALUE_RANGES: dict[str, ValueRange] = {
    "view": ValueRange(0.0, 24 * 3600.0),  # seconds watched
    "gift": ValueRange(0.0, 1e6),  # amount
    "rate": ValueRange(0.0, 5.0),  # stars
}
DEFAULT_VALUE_RANGE = ValueRange(0.0, 1e9)


def check_event(obj: object, bounds: EventTimeBounds, now_ms: int) -> str | None:
    """Row rules for one already-decoded JSON value. Returns the reason it is invalid, or None.

    The vectorised twin of this function is `ingestion.parse.row_reasons`; tests keep them equal.
    """
    if not isinstance(obj, dict):
        return "not a JSON object"
    for name in REQUIRED_FIELDS:
        if obj.get(name) is None:
            return f"missing field: {name}"
    eid = obj["event_id"]
    if not isinstance(eid, str):
        return "wrong type: event_id must be a string"
    if not eid or len(eid) > MAX_EVENT_ID_CHARS:
        return f"event_id must have 1..{MAX_EVENT_ID_CHARS} characters"
    for name in ("ts", "user_id", "item_id", "author_id"):
        val = obj.get(name)
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, int):
            return f"wrong type: {name} must be an integer"
        if not -(2**63) <= val < 2**63:
            return f"{name} out of int64 range"
    for name in ("user_id", "item_id", "author_id"):
        val = obj.get(name)
        if val is not None and val <= 0:
            return f"{name} must be > 0"
    ts = obj["ts"]
    if ts < bounds.min_ts_ms:
        return "ts before the allowed minimum"
    if ts > now_ms + bounds.max_future_ms:
        return "ts too far in the future"
    action = obj["action"]
    if not isinstance(action, str):
        return "wrong type: action must be a string"
    if action not in ACTION_INDEX:
        return "unknown action"
    rid = obj.get("request_id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_REQUEST_ID_CHARS):
        return f"request_id must be a string of at most {MAX_REQUEST_ID_CHARS} characters"
    value = obj.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "wrong type: value must be a number"
        if not math.isfinite(value):
            return "value is not finite"
        rng = VALUE_RANGES.get(action, DEFAULT_VALUE_RANGE)
        if not rng.low <= value <= rng.high:
            return f"value out of range for {action}"
    return None
