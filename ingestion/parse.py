"""Parse one landing file into valid event rows and rejected lines (with reasons).

Every line of the file ends up in exactly one of the two outputs. A file is streamed: its stored bytes
are read in blocks up to `ingest.max_file_bytes`, gunzipped (by name: `.gz`) in bounded steps up to
`ingest.max_decompressed_bytes`, and cut into chunks of whole lines, so a hostile file (a gzip bomb, one
endless line, a corrupt stream) costs bounded memory. What cannot be read past such a point becomes one
file-level reject (line_no -1) naming the reason; the lines read before it are parsed as usual.

The fast path hands whole chunks of lines to Arrow's JSON reader and applies the row rules vectorised; a
chunk Arrow cannot read (a malformed line, a wrong type, NaN, non-UTF-8 ...) is re-read line by line with
`json.loads` and `contract.check_event`, so one bad line costs one slow chunk, not a slow file.
"""

from __future__ import annotations

import bisect
import functools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
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
READ_BYTES = 1 << 20  # stored bytes per read, and content bytes per gunzip step
_JSON_READ = pj.ReadOptions(use_threads=False, block_size=1 << 20)
_JSON_PARSE = pj.ParseOptions(explicit_schema=RAW_EVENT_SCHEMA, unexpected_field_behavior="ignore")

# Rows of a parsed file: the event fields plus where each line came from.
VALID_SCHEMA = pa.schema([*RAW_EVENT_SCHEMA, pa.field("source_offset", pa.int64()),
                          pa.field("line_no", pa.int64())])
REJECT_SCHEMA = pa.schema([pa.field("raw", pa.large_binary()), pa.field("source_offset", pa.int64()),
                           pa.field("line_no", pa.int64()), pa.field("reason", pa.string())])

# What the parse task emits: the same, with the landing file each row came from.
VALID_FILE_SCHEMA = pa.schema([*VALID_SCHEMA, pa.field("source_file", pa.string())])
REJECT_FILE_SCHEMA = pa.schema([*REJECT_SCHEMA, pa.field("source_file", pa.string())])


@dataclass
class ParsedFile:
    valid: pa.Table  # VALID_SCHEMA
    rejects: pa.Table  # REJECT_SCHEMA
    lines: int  # lines read (valid + rejected, excluding a file-level record)


@dataclass(frozen=True)
class FileLimits:
    """Caps on one landing file (`ingest.max_file_bytes`, `ingest.max_decompressed_bytes`)."""

    max_file_bytes: int
    max_decompressed_bytes: int

    @classmethod
    def from_config(cls, ingest) -> FileLimits:
        return cls(ingest.max_file_bytes, ingest.max_decompressed_bytes)


@dataclass
class FileProblem:
    """Why reading a file stopped early: one file-level reject."""

    reason: str
    offset: int  # in the stored bytes for gzip damage, else in the content
    raw: bytes = b""  # gzip damage: the undecodable stored bytes from `offset` (at most one read block)


class FileContent:
    """The content of one landing file as blocks of at most READ_BYTES, within `limits`.

    Iterate it once; afterwards `problem` says why it stopped before the end of the file, if it did.
    """

    def __init__(self, name: str, stored: Iterable[bytes], limits: FileLimits):
        self.gzip = name.endswith(".gz")
        self.stored = stored
        self.limits = limits
        self.problem: FileProblem | None = None

    def _stop(self, problem: FileProblem) -> None:
        if self.problem is None:  # the first cause wins (a capped gzip stream also looks truncated)
            self.problem = problem

    def _capped(self, blocks: Iterator[bytes], cap: int, what: str) -> Iterator[bytes]:
        """`blocks` up to `cap` bytes; past it, a file problem naming `what` ("file ... (ingest.max_file_bytes)")."""
        total = 0
        for block in blocks:
            if total + len(block) > cap:
                yield block[:cap - total]
                self._stop(FileProblem(what.format(cap=cap), cap))
                return
            total += len(block)
            yield block

    def _gunzip(self, stored: Iterator[bytes]) -> Iterator[bytes]:
        d = zlib.decompressobj(wbits=31)
        fed = False  # has the current gzip member seen input?
        pos = 0  # stored offset of the start of `data`
        for data in stored:
            while True:
                # max_length bounds each step's output: a bomb inflates by at most READ_BYTES at a time.
                try:
                    out = d.decompress(data, READ_BYTES)
                except zlib.error as err:
                    self._stop(FileProblem(f"corrupt gzip: {err}", pos, bytes(data[:READ_BYTES])))
                    return
                fed = fed or bool(data)
                rest = d.unused_data if d.eof else d.unconsumed_tail
                pos += len(data) - len(rest)
                data = rest
                if out:
                    yield out
                if d.eof:  # concatenated gzip members are legal: start the next one
                    d, fed = zlib.decompressobj(wbits=31), False
                if not data and len(out) < READ_BYTES:
                    break  # input used up and no output pending: read more
        if fed and not d.eof:
            self._stop(FileProblem("corrupt gzip: truncated stream", pos))

    def __iter__(self) -> Iterator[bytes]:
        blocks = self._capped(self.stored, self.limits.max_file_bytes, "file over {cap} bytes (ingest.max_file_bytes)")
        if self.gzip:
            blocks = self._gunzip(blocks)
        yield from self._capped(blocks, self.limits.max_decompressed_bytes,
                                "content over {cap} bytes (ingest.max_decompressed_bytes)")


def read_stored(fs: pafs.FileSystem, path: str) -> Iterator[bytes]:
    """A file's stored bytes in blocks (never the whole file at once)."""
    with fs.open_input_stream(path, compression=None) as fh:
        while block := fh.read(READ_BYTES):
            yield block


@dataclass
class LineChunk:
    offset: int  # content offset of data[0]
    first_line: int  # line number of the first line in data
    data: bytes  # whole lines (the content's last line may lack its newline)
    oversize: bool = False  # data is the first MAX_LINE_BYTES bytes of one longer line

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """Offsets in `data` where its lines start: found once for the parser, the audit and `line_chunks`' count."""
        return np.zeros(1, np.int64) if self.oversize else line_starts(self.data)


def line_chunks(blocks: Iterable[bytes], chunk_bytes: int = CHUNK_BYTES) -> Iterator[LineChunk]:
    """Cut content blocks into chunks of whole lines; memory stays about chunk_bytes whatever the lines.

    A line that outgrows MAX_LINE_BYTES before its newline comes is yielded (truncated) as an `oversize`
    chunk of its own and the rest of it is skipped: one endless line cannot hold the whole file in memory.
    A chunk is made by one join of the blocks it spans: growing a buffer and copying it out touched twice the
    memory, and in a fresh process every page first touched costs a fault.
    """
    pending: list[bytes] = []  # blocks not yielded yet, the first possibly a previous block's tail
    size = 0
    offset = line = 0
    skipping = False  # inside a line already yielded as oversize
    for block in blocks:
        if skipping:
            nl = block.find(b"\n")
            if nl < 0:
                offset += len(block)
                continue
            offset += nl + 1
            block = block[nl + 1:]
            skipping = False
        if block:
            pending.append(block)
            size += len(block)
        if size < chunk_bytes:
            continue
        # The newest block with a newline, and its last one: one scan per block.
        last, cut = next(((i, c + 1) for i in range(len(pending) - 1, -1, -1)
                          if (c := pending[i].rfind(b"\n")) >= 0), (None, 0))
        if last is not None:
            head, tail = pending[last][:cut], pending[last][cut:]
            chunk = LineChunk(offset, line, b"".join([*pending[:last], head]) if last else head)
            yield chunk
            offset, line = offset + len(chunk.data), line + len(chunk.starts)  # every line of it ends in a newline
            size -= len(chunk.data)
            pending = [tail, *pending[last + 1:]] if tail else pending[last + 1:]
        if size > MAX_LINE_BYTES:
            yield LineChunk(offset, line, b"".join(pending)[:MAX_LINE_BYTES], oversize=True)
            offset, line = offset + size, line + 1
            pending, size = [], 0
            skipping = True
    if pending:
        yield LineChunk(offset, line, b"".join(pending))


def chunk_line_offsets(chunk: LineChunk) -> np.ndarray:
    """Content offsets of the lines that start in a chunk."""
    return chunk.starts + chunk.offset


def line_starts(content: bytes) -> np.ndarray:
    """Byte offsets where each line starts (a final line without newline counts).

    >>> line_starts(b"a\\nbc\\n\\nd").tolist()
    [0, 2, 5, 6]
    """
    buf = np.frombuffer(content, dtype=np.uint8)
    # A slice at a time: one comparison of a whole chunk made a mask as big as the chunk, memory a fresh process
    # touches for the first time (a page fault per 4 KiB) at every chunk.
    nl = np.concatenate([np.zeros(0, np.int64),
                         *(np.flatnonzero(buf[i:i + READ_BYTES] == 10) + i for i in range(0, len(buf), READ_BYTES))])
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    if len(content) == 0 or starts[-1] == len(content):
        starts = starts[:-1]
    return starts


_LOW = pa.array([VALUE_RANGES.get(a, DEFAULT_VALUE_RANGE).low for a in ACTIONS], pa.float64())
_HIGH = pa.array([VALUE_RANGES.get(a, DEFAULT_VALUE_RANGE).high for a in ACTIONS], pa.float64())
_VALUE_RULE = "value out of range for {action}"


def _rule_masks(table: pa.Table, bounds: EventTimeBounds, now_ms: int) -> list[tuple[str, pa.ChunkedArray]]:
    """(reason, rows breaking the rule) in `check_event`'s order; a null comparison breaks no rule."""
    eid_len = pc.utf8_length(table["event_id"])
    action_no = pc.index_in(table["action"], value_set=pa.array(ACTIONS))
    value = table["value"]
    rules = [(f"missing field: {name}", pc.is_null(table[name])) for name in REQUIRED_FIELDS]
    rules.append((f"event_id must have 1..{MAX_EVENT_ID_CHARS} characters",
                  pc.or_(pc.less(eid_len, 1), pc.greater(eid_len, MAX_EVENT_ID_CHARS))))
    rules += [(f"{name} must be > 0", pc.less_equal(table[name], 0)) for name in ("user_id", "item_id", "author_id")]
    rules += [("ts before the allowed minimum", pc.less(table["ts"], bounds.min_ts_ms)),
              ("ts too far in the future", pc.greater(table["ts"], now_ms + bounds.max_future_ms)),
              ("unknown action", pc.is_null(action_no)),
              (f"request_id must be a string of at most {MAX_REQUEST_ID_CHARS} characters",
               pc.greater(pc.utf8_length(table["request_id"]), MAX_REQUEST_ID_CHARS)),
              ("value is not finite", pc.invert(pc.is_finite(value))),
              (_VALUE_RULE, pc.or_(pc.less(value, pc.take(_LOW, action_no)),
                                   pc.greater(value, pc.take(_HIGH, action_no))))]
    return [(reason, pc.fill_null(mask, False)) for reason, mask in rules]


def row_reasons(table: pa.Table, bounds: EventTimeBounds, now_ms: int) -> np.ndarray:
    """Vectorised twin of `contract.check_event` for rows Arrow already typed: reason or None per row.

    The rules run as Arrow kernels over every row; reasons are only assembled for the (few) rows that break one.
    """
    reasons = np.full(table.num_rows, None, dtype=object)
    rules = _rule_masks(table, bounds, now_ms)
    any_broken = rules[0][1]
    for _, mask in rules[1:]:
        any_broken = pc.or_(any_broken, mask)
    bad = np.flatnonzero(any_broken.to_numpy(zero_copy_only=False))
    if bad.size == 0:
        return reasons
    picked = pa.array(bad)
    found = np.full(bad.size, None, dtype=object)
    actions = table["action"].take(picked).to_pylist()
    for reason, mask in rules:
        hit = mask.take(picked).to_numpy(zero_copy_only=False) & (found == None)  # noqa: E711 (elementwise)
        if reason == _VALUE_RULE:
            found[hit] = [reason.format(action=actions[i]) for i in np.flatnonzero(hit)]
        else:
            found[hit] = reason
    reasons[bad] = found
    return reasons


def _rows_to_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in RAW_EVENT_SCHEMA}
    cols["value"] = [None if v is None else float(v) for v in cols["value"]]
    return pa.Table.from_pydict(cols, schema=RAW_EVENT_SCHEMA)


class _Collector:
    def __init__(self) -> None:
        self.valid: list[pa.Table] = []
        self.rejects: dict[str, list] = {"raw": [], "source_offset": [], "line_no": [], "reason": []}
        self.base = 0  # content offset of the bytes being parsed (offsets below are relative to them)

    def reject(self, raw: bytes, offset: int, line_no: int, reason: str) -> None:
        self.rejects["raw"].append(raw)
        self.rejects["source_offset"].append(self.base + offset)
        self.rejects["line_no"].append(line_no)
        self.rejects["reason"].append(reason)

    def add_valid(self, table: pa.Table, offsets: np.ndarray, line_nos: np.ndarray) -> None:
        self.valid.append(table.append_column("source_offset", pa.array(self.base + offsets, pa.int64()))
                          .append_column("line_no", pa.array(line_nos, pa.int64())))

    def result(self, lines: int) -> ParsedFile:
        valid = pa.concat_tables(self.valid) if self.valid else VALID_SCHEMA.empty_table()
        return ParsedFile(valid, pa.Table.from_pydict(self.rejects, schema=REJECT_SCHEMA), lines)


OVERSIZE_REASON = f"line over {MAX_LINE_BYTES} bytes"  # its raw keeps the first MAX_LINE_BYTES bytes


def _parse_lines_slow(content: bytes, starts: np.ndarray, ends: np.ndarray, first_line: int,
                      bounds: EventTimeBounds, now_ms: int, out: _Collector) -> None:
    good: list[dict] = []
    good_at: list[int] = []
    for idx, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        raw = content[s:e]
        body = raw.rstrip(b"\r\n")
        reason: str | None
        if len(body) > MAX_LINE_BYTES:
            raw, reason = raw[:MAX_LINE_BYTES], OVERSIZE_REASON
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


def _is_utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8, checked by Arrow without copying it.

    >>> _is_utf8("été".encode()), _is_utf8(b"\\xff\\xfe")
    (True, False)
    """
    offsets = pa.py_buffer(np.array([0, len(data)], np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _parse_chunk(content: bytes, starts: np.ndarray, ends: np.ndarray, first_line: int,
                 bounds: EventTimeBounds, now_ms: int, out: _Collector) -> None:
    lengths = ends - starts
    if (lengths <= 1).any() or (lengths > MAX_LINE_BYTES).any():
        return _parse_lines_slow(content, starts, ends, first_line, bounds, now_ms, out)
    chunk = content[starts[0]:ends[-1]]
    try:
        # Arrow's reader lets invalid UTF-8 through inside strings. Both read the chunk in place (a decoded copy
        # and a Python file around it cost allocations, and page faults, of their own).
        table = pj.read_json(pa.BufferReader(chunk), read_options=_JSON_READ, parse_options=_JSON_PARSE) \
            if _is_utf8(chunk) else None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        table = None
    if table is None or table.num_rows != len(starts):
        return _parse_lines_slow(content, starts, ends, first_line, bounds, now_ms, out)
    reasons = row_reasons(table, bounds, now_ms)
    bad = reasons != None  # noqa: E711
    line_nos = first_line + np.arange(len(starts), dtype=np.int64)
    for i in np.flatnonzero(bad).tolist():
        out.reject(content[starts[i]:ends[i]], int(starts[i]), int(line_nos[i]), reasons[i])
    if not bad.any():  # the usual chunk: no copy of its rows
        out.add_valid(table, starts, line_nos)
        return
    keep = ~bad
    out.add_valid(table.filter(pa.array(keep)), starts[keep], line_nos[keep])


def _parse_line_chunk(chunk: LineChunk, bounds: EventTimeBounds, now_ms: int, out: _Collector) -> int:
    """Parse one chunk of whole lines into `out`; returns its line count."""
    out.base = chunk.offset
    if chunk.oversize:
        out.reject(chunk.data, 0, chunk.first_line, OVERSIZE_REASON)
        return 1
    content, starts = chunk.data, chunk.starts
    ends = np.append(starts[1:], len(content)).astype(np.int64)
    i = 0
    while i < len(starts):
        # Arrow reads runs of whole lines of about CHUNK_BYTES (a caller may hand over more at once).
        j = max(int(np.searchsorted(starts, starts[i] + CHUNK_BYTES, side="left")), i + 1)
        _parse_chunk(content, starts[i:j], ends[i:j], chunk.first_line + i, bounds, now_ms, out)
        i = j
    return len(starts)


def parse_content(content: bytes, bounds: EventTimeBounds, now_ms: int) -> ParsedFile:
    """Parse decompressed JSON-lines bytes."""
    out = _Collector()
    lines = sum(_parse_line_chunk(c, bounds, now_ms, out) for c in line_chunks([content]))
    return out.result(lines)


def parse_file(name: str, stored: Iterable[bytes], bounds: EventTimeBounds, now_ms: int,
               limits: FileLimits) -> ParsedFile:
    """Parse a landing file from its stored bytes (gzip when the name ends in .gz), streaming."""
    content = FileContent(name, stored, limits)
    out = _Collector()
    lines = sum(_parse_line_chunk(c, bounds, now_ms, out) for c in line_chunks(content))
    out.base = 0
    if content.problem is not None:
        out.reject(content.problem.raw, content.problem.offset, -1, content.problem.reason)
    elif lines == 0:
        out.reject(b"", 0, -1, "empty file")
    return out.result(lines)


def read_lines_at(name: str, stored: Iterable[bytes], offsets: list[int], limits: FileLimits) -> list[bytes]:
    """The raw lines that start at `offsets` (used to quarantine rows that parsed as valid), streaming."""
    wanted = sorted(set(offsets))
    found: dict[int, bytes] = {}
    for chunk in line_chunks(FileContent(name, stored, limits)):
        end_of_chunk = chunk.offset + len(chunk.data)
        for off in wanted[bisect.bisect_left(wanted, chunk.offset):bisect.bisect_left(wanted, end_of_chunk)]:
            local = off - chunk.offset
            nl = chunk.data.find(b"\n", local)
            found[off] = chunk.data[local:] if nl < 0 else chunk.data[local:nl + 1]
    return [found[off] for off in offsets]


def _file_reject(reason: str) -> ParsedFile:
    out = _Collector()
    out.reject(b"", 0, -1, reason)
    return out.result(0)


def parse_landing_files(names: list[str], *, landing: str, bounds: EventTimeBounds, now_ms: int,
                        limits: FileLimits, isolate: bool) -> tuple[pa.Table, pa.Table]:
    """Landing files (`names` in the folder `landing`) -> (valid rows, rejects), each in file and line order.

    The two tables are `VALID_SCHEMA` and `REJECT_SCHEMA` plus `source_file`. Files are opened by path inside
    the folder, never as URIs, so names with '#', '?', '%' or spaces are read as they are. Content problems
    are rejects already; with `isolate` (a batch's last attempt) any other error reading one file (a deleted
    file, a denied read) also becomes that file's reject, so one bad file cannot fail its batch forever.
    """
    fs, root = storage.filesystem(landing)
    valid, rejects = [], []
    for name in names:
        try:
            parsed = parse_file(name, read_stored(fs, f"{root}/{name}"), bounds, now_ms, limits)
        except Exception as err:
            if not isolate:
                raise
            parsed = _file_reject(f"unreadable file: {type(err).__name__}: {err}")
        for rows, out in ((parsed.valid, valid), (parsed.rejects, rejects)):
            out.append(rows.append_column("source_file", pa.repeat(pa.scalar(name), rows.num_rows)))
    return (pa.concat_tables(valid) if valid else VALID_FILE_SCHEMA.empty_table(),
            pa.concat_tables(rejects) if rejects else REJECT_FILE_SCHEMA.empty_table())
