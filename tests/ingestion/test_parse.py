"""Row-level parsing: every bad input gets its reason; the fast and slow paths agree."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestion.contract import ACTIONS, MAX_LINE_BYTES, EventTimeBounds, check_event
from ingestion.parse import FileLimits, parse_content, parse_file

NOW_MS = 1_790_000_000_000
BOUNDS = EventTimeBounds()
LIMITS = FileLimits(max_file_bytes=1 << 30, max_decompressed_bytes=1 << 30)


def parse_file_bytes(name: str, data: bytes):
    return parse_file(name, [data], BOUNDS, NOW_MS, LIMITS)


def event(i: int, **overrides) -> dict:
    e = {"event_id": f"e{i}", "ts": 1_767_225_600_000 + i, "user_id": 1 + i, "item_id": 2 + i,
         "author_id": 3, "request_id": f"r{i}", "action": "view", "value": 12.5}
    e.update(overrides)
    return {k: v for k, v in e.items() if v is not ...}


def line(obj) -> bytes:
    return json.dumps(obj).encode()


BAD_LINES = {
    "malformed JSON": b'{"event_id": "x" "ts": 1}',
    "truncated": b'{"event_id": "x", "ts": 17672256',
    "missing field: user_id": line(event(1, user_id=...)),
    "wrong type: ts must be an integer": line(event(1, ts="1767225600000")),
    "wrong type: user_id must be an integer": line(event(1, user_id=1.5)),
    "user_id must be > 0": line(event(1, user_id=0)),
    "item_id must be > 0": line(event(1, item_id=-4)),
    "unknown action": line(event(1, action="dance")),
    "value is not finite": b'{"event_id":"n","ts":1767225600000,"user_id":1,"item_id":2,"action":"view","value":NaN}',
    "value is not finite (inf)": b'{"event_id":"n","ts":1767225600000,"user_id":1,"item_id":2,"action":"gift",'
                                 b'"value":1e999}',
    "ts too far in the future": line(event(1, ts=NOW_MS + 10 * 86_400_000)),
    "ts before the allowed minimum": line(event(1, ts=900_000_000_000)),
    "not valid UTF-8": b'{"event_id":"\xff\xfe","ts":1767225600000,"user_id":1,"item_id":2,"action":"view"}',
    "empty line": b"   ",
    "not a JSON object": b"[1, 2, 3]",
}


def expected_prefix(label: str) -> str:
    return {"truncated": "malformed JSON", "value is not finite (inf)": "value is not finite"}.get(label, label)


@pytest.mark.parametrize("label", sorted(BAD_LINES))
def test_each_bad_line_is_quarantined_with_its_reason_and_neighbours_survive(label):
    lines = [line(event(1)), BAD_LINES[label], line(event(2))]
    parsed = parse_content(b"\n".join(lines) + b"\n", BOUNDS, NOW_MS)
    assert parsed.valid["event_id"].to_pylist() == ["e1", "e2"]
    assert parsed.rejects.num_rows == 1
    reject = parsed.rejects.to_pylist()[0]
    assert reject["reason"].startswith(expected_prefix(label))
    assert reject["raw"].rstrip(b"\n") == BAD_LINES[label]
    assert reject["line_no"] == 1
    assert reject["source_offset"] == len(lines[0]) + 1


def test_line_over_one_mebibyte_is_rejected_without_parsing():
    huge = b'{"event_id": "' + b"x" * MAX_LINE_BYTES + b'"}'
    parsed = parse_content(line(event(1)) + b"\n" + huge + b"\n", BOUNDS, NOW_MS)
    assert parsed.valid.num_rows == 1
    assert parsed.rejects["reason"].to_pylist() == [f"line over {MAX_LINE_BYTES} bytes"]
    assert parsed.rejects["raw"][0].as_py() == huge[:MAX_LINE_BYTES]  # bounded: the head is kept


def test_empty_file_is_recorded():
    parsed = parse_file_bytes("x.jsonl", b"")
    assert parsed.valid.num_rows == 0
    assert parsed.rejects["reason"].to_pylist() == ["empty file"]


def test_gzip_and_corrupt_gzip_keep_the_intact_prefix():
    body = b"\n".join(line(event(i)) for i in range(2000)) + b"\n"
    whole = gzip.compress(body)
    assert parse_file_bytes("a.jsonl.gz", whole).valid.num_rows == 2000
    cut = whole[: len(whole) // 2]
    parsed = parse_file_bytes("a.jsonl.gz", cut)
    reasons = parsed.rejects["reason"].to_pylist()
    assert reasons[-1].startswith("corrupt gzip")
    assert 0 < parsed.valid.num_rows < 2000
    # Rows that survived are exactly a prefix of the input: nothing invented.
    assert parsed.valid["event_id"].to_pylist() == [f"e{i}" for i in range(parsed.valid.num_rows)]


def test_a_line_without_trailing_newline_is_read():
    parsed = parse_content(line(event(1)) + b"\n" + line(event(2)), BOUNDS, NOW_MS)
    assert parsed.valid["event_id"].to_pylist() == ["e1", "e2"]


json_values = st.one_of(st.none(), st.integers(-5, 2**63 + 5), st.floats(allow_nan=True), st.text(max_size=5),
                        st.booleans())
events = st.fixed_dictionaries(
    {"event_id": st.one_of(st.text(min_size=0, max_size=4), json_values),
     "ts": st.one_of(st.integers(1_767_225_600_000, NOW_MS + 3 * 86_400_000), json_values),
     "user_id": st.one_of(st.integers(-2, 50), json_values),
     "item_id": st.one_of(st.integers(-2, 50), json_values),
     "action": st.one_of(st.sampled_from(ACTIONS), json_values)},
    optional={"author_id": st.one_of(st.integers(-2, 50), json_values),
              "value": st.one_of(st.floats(-1, 1e7), json_values),
              "request_id": st.one_of(st.text(max_size=3), json_values)},
)


@settings(max_examples=60, deadline=None)
@given(st.lists(events, min_size=1, max_size=12))
def test_fast_vectorised_path_agrees_with_row_rules(batch):
    """Whatever mix of good and bad events, each line lands where `check_event` says it should."""
    content = b"\n".join(json.dumps(e).encode() for e in batch) + b"\n"
    parsed = parse_content(content, BOUNDS, NOW_MS)
    expected = [check_event(json.loads(json.dumps(e)), BOUNDS, NOW_MS) for e in batch]
    assert parsed.valid.num_rows + parsed.rejects.num_rows == len(batch)
    assert sorted(parsed.valid["line_no"].to_pylist()) == [i for i, r in enumerate(expected) if r is None]
    got = dict(zip(parsed.rejects["line_no"].to_pylist(), parsed.rejects["reason"].to_pylist()))
    assert got == {i: r for i, r in enumerate(expected) if r is not None}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"", b"a", b"bb", b"ccccc", b"d" * 30, b"e" * 90]), max_size=40),
       st.booleans(), st.lists(st.integers(1, 50), min_size=1, max_size=8), st.integers(8, 120))
def test_line_chunks_cover_the_content_in_whole_lines(lines, last_has_newline, cuts, chunk_bytes):
    """Whatever the blocks' boundaries: chunks are whole lines of the content at their offsets, nothing is lost or
    repeated, and a line longer than MAX_LINE_BYTES (40 here) is cut to its head and skipped past."""
    from unittest import mock

    import ingestion.parse as parse

    content = b"\n".join(lines) + (b"\n" if last_has_newline and lines else b"")
    blocks, at = [], 0
    while at < len(content):  # the content in blocks of the sizes drawn, cycling
        size = cuts[len(blocks) % len(cuts)]
        blocks.append(content[at:at + size])
        at += size
    with mock.patch.object(parse, "MAX_LINE_BYTES", 40):
        chunks = list(parse.line_chunks(blocks, chunk_bytes))
    at = line = 0
    for i, chunk in enumerate(chunks):
        assert (chunk.offset, chunk.first_line) == (at, line)
        if chunk.oversize:
            assert chunk.data == content[at:at + 40]
            nl = content.find(b"\n", at)
            at = len(content) if nl < 0 else nl + 1
            line += 1
        else:
            assert chunk.data == content[at:at + len(chunk.data)] and chunk.data
            assert chunk.data.endswith(b"\n") or i == len(chunks) - 1
            assert len(chunk.data) <= max(chunk_bytes, 40) + max(cuts)  # bounded memory
            at += len(chunk.data)
            line += len(chunk.starts)
    assert at == len(content)
    assert line == content.count(b"\n") + (1 if content and not content.endswith(b"\n") else 0)
