"""Parse one landing file into valid event rows and rejected lines (with reasons).

Every line of the file ends up in exactly one of the two outputs. The fast path hands whole
chunks of lines to Arrow's JSON reader and applies the row rules vectorised; a chunk Arrow
cannot read (a malformed line, a wrong type, NaN, non-UTF-8 ...) is re-read line by line with
`json.loads` and `contract.check_event`, so one bad line costs one slow chunk, not a slow file.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

import storage
from ingestion.contract import (
    ACTIONS,
    DEFAULT_VALUE_RANGE,
    MAX_EVENT_ID_CHARS,
    MAX_LINE_BYTES,
    MAX_REQUEST_ID_CHARS,
    RAW_EVENT_SCHEMA,
    REQUIRED_FIELDS,
    VALUE_RANGES,
    EventTimeBounds,
    check_event,
)

CHUNK_BYTES = 8 << 20
GZIP_READ_BYTES = 1 << 20
_JSON_PARSE = pj.ParseOptions(explicit_schema=RAW_EVENT_SCHEMA, unexpected_field_behavior="ignore")

# Rows of a parsed file: the event fields plus where each line came from.
VALID_SCHEMA = pa.schema([*RAW_EVENT_SCHEMA, pa.field("source_offset", pa.int64()),
                          pa.field("line_no", pa.int64())])
REJECT_SCHEMA = pa.schema([pa.field("raw", pa.large_binary()), pa.field("source_offset", pa.int64()),
                           pa.field("line_no", pa.int64()), pa.field("reason", pa.string())])

# What the Ray Data parse step emits: valid rows have reason null, rejects carry raw bytes and reason.
PARSED_SCHEMA = pa.schema([*VALID_SCHEMA, pa.field("raw", pa.large_binary()), pa.field("reason", pa.string()),
                           pa.field("source_file", pa.string())])


@dataclass
class ParsedFile:
    valid: pa.Table  # VALID_SCHEMA
    rejects: pa.Table  # REJECT_SCHEMA
    lines: int  # lines read (valid + rejected, excluding a file-level record)


def decompress(data: bytes) -> tuple[bytes, tuple[bytes, int, str] | None]:
    """Gunzip as far as the stream is intact. Returns (content, (tail, offset, error) or None).

    A corrupt stream keeps every line decoded before the damage; the undecodable compressed
    tail is returned so that it can be quarantined as it was (nothing is lost).
    """
    out: list[bytes] = []
    pos = 0
    d = zlib.decompressobj(wbits=31)
    while pos < len(data):
        piece = data[pos:pos + GZIP_READ_BYTES]
        try:
            out.append(d.decompress(piece))
        except zlib.error as err:
            return b"".join(out), (data[pos:], pos, f"corrupt gzip: {err}")
        pos += len(piece)
        if d.eof:  # concatenated gzip members are legal: start the next one
            rest = d.unused_data
            pos -= len(rest)
            if not rest:
                break
            d = zlib.decompressobj(wbits=31)
    if not d.eof:
        out.append(d.flush())
        return b"".join(out), (b"", len(data), "corrupt gzip: truncated stream")
    return b"".join(out), None


def line_starts(content: bytes) -> np.ndarray:
    """Byte offsets where each line starts (a final line without newline counts)."""
    buf = np.frombuffer(content, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    if len(content) == 0 or starts[-1] == len(content):
        starts = starts[:-1]
    return starts


def row_reasons(table: pa.Table, bounds: EventTimeBounds, now_ms: int) -> np.ndarray:
    """Vectorised twin of `contract.check_event` for rows Arrow already typed: reason or None."""
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)

    def flag(mask: pa.Array | np.ndarray, reason: str) -> None:
        m = np.asarray(pc.fill_null(mask, False)) if isinstance(mask, pa.Array | pa.ChunkedArray) else mask
        reasons[m & (reasons == None)] = reason  # noqa: E711 (elementwise)

    for name in REQUIRED_FIELDS:
        flag(pc.is_null(table[name]), f"missing field: {name}")
    eid_len = pc.utf8_length(table["event_id"])
    flag(pc.or_(pc.less(eid_len, 1), pc.greater(eid_len, MAX_EVENT_ID_CHARS)),
         f"event_id must have 1..{MAX_EVENT_ID_CHARS} characters")
    for name in ("user_id", "item_id", "author_id"):
        flag(pc.less_equal(table[name], 0), f"{name} must be > 0")
    flag(pc.less(table["ts"], bounds.min_ts_ms), "ts before the allowed minimum")
    flag(pc.greater(table["ts"], now_ms + bounds.max_future_ms), "ts too far in the future")
    flag(pc.invert(pc.is_in(table["action"], value_set=pa.array(ACTIONS))), "unknown action")
    flag(pc.greater(pc.utf8_length(table["request_id"]), MAX_REQUEST_ID_CHARS),
         f"request_id must be a string of at most {MAX_REQUEST_ID_CHARS} characters")
    value = table["value"]
    flag(pc.invert(pc.is_finite(value)), "value is not finite")
    for action in ACTIONS:
        rng = VALUE_RANGES.get(action, DEFAULT_VALUE_RANGE)
        out = pc.or_(pc.less(value, rng.low), pc.greater(value, rng.high))
        flag(pc.and_(pc.equal(table["action"], action), out), f"value out of range for {action}")
    return reasons


def _rows_to_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in RAW_EVENT_SCHEMA}
    cols["value"] = [None if v is None else float(v) for v in cols["value"]]
    return pa.Table.from_pydict(cols, schema=RAW_EVENT_SCHEMA)


class _Collector:
    def __init__(self) -> None:
        self.valid: list[pa.Table] = []
        self.rejects: dict[str, list] = {"raw": [], "source_offset": [], "line_no": [], "reason": []}

    def reject(self, raw: bytes, offset: int, line_no: int, reason: str) -> None:
        self.rejects["raw"].append(raw)
        self.rejects["source_offset"].append(offset)
        self.rejects["line_no"].append(line_no)
        self.rejects["reason"].append(reason)

    def add_valid(self, table: pa.Table, offsets: np.ndarray, line_nos: np.ndarray) -> None:
        self.valid.append(table.append_column("source_offset", pa.array(offsets, pa.int64()))
                          .append_column("line_no", pa.array(line_nos, pa.int64())))


def _parse_lines_slow(content: bytes, starts: np.ndarray, ends: np.ndarray, first_line: int,
                      bounds: EventTimeBounds, now_ms: int, out: _Collector) -> None:
    good: list[dict] = []
    good_at: list[int] = []
    for idx, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        raw = content[s:e]
        body = raw.rstrip(b"\r\n")
        reason: str | None
        if len(body) > MAX_LINE_BYTES:
            reason = f"line over {MAX_LINE_BYTES} bytes"
        elif not body.strip():
            reason = "empty line"
        else:
            try:
                obj = json.loads(body.decode("utf-8"))
                reason = check_event(obj, bounds, now_ms)
            except UnicodeDecodeError:
                reason = "not valid UTF-8"
            except (json.JSONDecodeError, RecursionError) as err:
                reason = f"malformed JSON: {err.msg if hasattr(err, 'msg') else err}"
        if reason is None:
            good.append(obj)
            good_at.append(idx)
        else:
            out.reject(raw, s, first_line + idx, reason)
    if good:
        at = np.asarray(good_at, dtype=np.int64)
        out.add_valid(_rows_to_table(good), starts[at], first_line + at)


def _parse_chunk(content: bytes, starts: np.ndarray, ends: np.ndarray, first_line: int,
                 bounds: EventTimeBounds, now_ms: int, out: _Collector) -> None:
    lengths = ends - starts
    if (lengths <= 1).any() or (lengths > MAX_LINE_BYTES).any():
        return _parse_lines_slow(content, starts, ends, first_line, bounds, now_ms, out)
    chunk = content[starts[0]:ends[-1]]
    try:
        chunk.decode("utf-8")  # Arrow's reader lets invalid UTF-8 through inside strings
        table = pj.read_json(io.BytesIO(chunk), parse_options=_JSON_PARSE)
    except (UnicodeDecodeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        table = None
    if table is None or table.num_rows != len(starts):
        return _parse_lines_slow(content, starts, ends, first_line, bounds, now_ms, out)
    reasons = row_reasons(table, bounds, now_ms)
    bad = reasons != None  # noqa: E711
    line_nos = first_line + np.arange(len(starts), dtype=np.int64)
    for i in np.flatnonzero(bad).tolist():
        out.reject(content[starts[i]:ends[i]], int(starts[i]), int(line_nos[i]), reasons[i])
    keep = ~bad
    out.add_valid(table.filter(pa.array(keep)), starts[keep], line_nos[keep])


def parse_content(content: bytes, bounds: EventTimeBounds, now_ms: int) -> ParsedFile:
    """Parse decompressed JSON-lines bytes."""
    out = _Collector()
    starts = line_starts(content)
    ends = np.append(starts[1:], len(content)).astype(np.int64)
    i = 0
    while i < len(starts):
        # A chunk is a run of whole lines of about CHUNK_BYTES.
        j = int(np.searchsorted(starts, starts[i] + CHUNK_BYTES, side="left"))
        j = max(j, i + 1)
        _parse_chunk(content, starts[i:j], ends[i:j], i, bounds, now_ms, out)
        i = j
    valid = pa.concat_tables(out.valid) if out.valid else VALID_SCHEMA.empty_table()
    rejects = pa.Table.from_pydict(out.rejects, schema=REJECT_SCHEMA)
    return ParsedFile(valid=valid, rejects=rejects, lines=len(starts))


def parse_file_bytes(name: str, data: bytes, bounds: EventTimeBounds, now_ms: int) -> ParsedFile:
    """Parse a landing file's bytes (gzip when the name ends in .gz)."""
    damage = None
    if name.endswith(".gz"):
        data, damage = decompress(data)
    parsed = parse_content(data, bounds, now_ms)
    extra = _Collector()
    if damage is not None:
        tail, offset, reason = damage
        extra.reject(tail, offset, -1, reason)
    elif parsed.lines == 0:
        extra.reject(b"", 0, -1, "empty file")
    if extra.rejects["raw"]:
        parsed.rejects = pa.concat_tables(
            [parsed.rejects, pa.Table.from_pydict(extra.rejects, schema=REJECT_SCHEMA)])
    return parsed


def read_lines_at(name: str, data: bytes, offsets: list[int]) -> list[bytes]:
    """The raw lines that start at `offsets` (used to quarantine rows that parsed as valid)."""
    if name.endswith(".gz"):
        data, _ = decompress(data)
    lines = []
    for off in offsets:
        end = data.find(b"\n", off)
        lines.append(data[off:] if end < 0 else data[off:end + 1])
    return lines


def parse_landing_files(batch: pa.Table, *, bounds: EventTimeBounds, now_ms: int) -> pa.Table:
    """Ray Data map over rows (name, uri) of landing files: each file -> its parsed rows and rejects.

    Files are read here, as bytes, rather than with `read_binary_files`, which would gunzip by
    extension and fail on a corrupt stream instead of keeping its intact prefix.
    """
    outputs = []
    for name, uri in zip(batch["name"].to_pylist(), batch["uri"].to_pylist()):
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path, compression=None) as fh:
            data = fh.read()
        parsed = parse_file_bytes(name, data, bounds, now_ms)
        n_valid, n_rej = parsed.valid.num_rows, parsed.rejects.num_rows
        valid = parsed.valid.append_column("raw", pa.nulls(n_valid, pa.large_binary())) \
            .append_column("reason", pa.nulls(n_valid, pa.string()))
        rej_cols = {f.name: pa.nulls(n_rej, f.type) for f in VALID_SCHEMA}
        for f in REJECT_SCHEMA:
            rej_cols[f.name] = parsed.rejects[f.name]
        rejects = pa.table(rej_cols).select(valid.column_names)
        both = pa.concat_tables([valid, rejects])
        outputs.append(both.append_column("source_file", pa.array([name] * both.num_rows, pa.string())))
    return pa.concat_tables(outputs).cast(PARSED_SCHEMA)
