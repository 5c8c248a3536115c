"""Hostile landing input and concurrent runs: ingestion isolates the bad file, lands the rest, never loops.

Parser-level checks run without Ray; the job-level ones share the session's local Ray (tests/conftest.py).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

import ingestion.job
from config.schema import IngestConfig
from ingestion.audit import audit_lake
from ingestion.contract import MAX_LINE_BYTES, EventTimeBounds, check_event
from ingestion.job import BatchFailedError, IngestJob, PlanConflictError
from ingestion.parse import FileLimits, parse_content, parse_file, parse_landing_files
from tests.ingestion.lake_checks import good_event, lake_rows, make_config, write_lines
from tests.threads import run_together

NOW_MS = 1_790_000_000_000
BOUNDS = EventTimeBounds()
ODD_NAMES = ["b#1.jsonl", "c?x=1&y.jsonl", "d%41 e.jsonl", "e %2F[x].jsonl"]


def lines_of(events: list[dict]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def bomb(prefix: bytes, zeros_mib: int) -> bytes:
    """A gzip file: `prefix`, then `zeros_mib` MiB of '0' (about 1,000 times smaller compressed). The zeros are
    repeated 16 MiB gzip members: concatenated members are one valid stream, and quick to build."""
    member = gzip.compress(b"0" * (16 << 20), compresslevel=9)
    return gzip.compress(prefix) + member * (zeros_mib // 16)


def peak_mib(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


# -- one file, no Ray ---------------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_decompressed_cap_in_bounded_memory():
    good = [good_event(i) for i in range(50)]
    data = bomb(lines_of(good), zeros_mib=512)
    assert len(data) < 1 << 20
    limits = FileLimits(max_file_bytes=1 << 30, max_decompressed_bytes=8 << 20)
    parsed, peak = peak_mib(lambda: parse_file("x.jsonl.gz", [data], BOUNDS, NOW_MS, limits))
    assert peak < 64, f"{peak:.0f} MiB held for a 512 MiB bomb"
    assert parsed.valid["event_id"].to_pylist() == [e["event_id"] for e in good]
    file_level = [r for r in parsed.rejects.to_pylist() if r["line_no"] == -1]
    assert [r["reason"] for r in file_level] == [f"content over {8 << 20} bytes (ingest.max_decompressed_bytes)"]
    # The zeros after the events are one endless line: quarantined once, its head kept.
    assert [(r["reason"], len(r["raw"])) for r in parsed.rejects.to_pylist() if r["line_no"] >= 0] == \
        [(f"line over {MAX_LINE_BYTES} bytes", MAX_LINE_BYTES)]


def test_an_endless_line_is_quarantined_and_the_next_line_lands_in_bounded_memory():
    def stored():  # 96 MiB without a newline, then one good event; never one big bytes object
        yield b'{"event_id": "'
        for _ in range(96):
            yield b"x" * (1 << 20)
        yield b'"}\n' + lines_of([good_event(7)])

    limits = FileLimits(max_file_bytes=1 << 30, max_decompressed_bytes=1 << 30)
    parsed, peak = peak_mib(lambda: parse_file("x.jsonl", stored(), BOUNDS, NOW_MS, limits))
    assert peak < 48, f"{peak:.0f} MiB held for one 96 MiB line"
    assert parsed.valid["event_id"].to_pylist() == ["e7"]
    assert parsed.valid["source_offset"].to_pylist() == [14 + (96 << 20) + 3]
    assert parsed.rejects["reason"].to_pylist() == [f"line over {MAX_LINE_BYTES} bytes"]
    assert parsed.lines == 2


def test_a_file_over_the_stored_cap_keeps_the_lines_before_it():
    body = lines_of([good_event(i) for i in range(100)])
    cap = len(body) // 2
    parsed = parse_file("x.jsonl", [body], BOUNDS, NOW_MS, FileLimits(cap, 1 << 30))
    whole_lines = body[:cap].count(b"\n")
    assert parsed.valid.num_rows == whole_lines
    reasons = parsed.rejects["reason"].to_pylist()
    assert reasons[-1] == f"file over {cap} bytes (ingest.max_file_bytes)"
    assert reasons[:-1] in ([], ["malformed JSON: Unterminated string starting at"]) or \
        reasons[0].startswith("malformed JSON")  # the line cut by the cap


@pytest.mark.parametrize("data", [b"\x1f\x8b\x08\x00garbage" * 100, b"PK\x03\x04 not gzip at all"])
def test_corrupt_gzip_is_one_file_level_reject(data):
    parsed = parse_file("x.jsonl.gz", [data], BOUNDS, NOW_MS, FileLimits(1 << 30, 1 << 30))
    assert parsed.valid.num_rows == 0
    [reject] = parsed.rejects.to_pylist()
    assert reject["reason"].startswith("corrupt gzip") and reject["line_no"] == -1 and reject["raw"] == data


def test_non_utf8_bytes_are_quarantined_line_by_line():
    rng = random.Random(3)
    junk = [bytes(rng.randrange(128, 256) for _ in range(40)) for _ in range(5)]
    content = lines_of([good_event(1)]) + b"\n".join(junk) + b"\n" + lines_of([good_event(2)])
    parsed = parse_content(content, BOUNDS, NOW_MS)
    assert parsed.valid["event_id"].to_pylist() == ["e1", "e2"]
    assert parsed.rejects["raw"].to_pylist() == [j + b"\n" for j in junk]
    assert set(parsed.rejects["reason"].to_pylist()) == {"not valid UTF-8"}


def test_events_more_than_the_allowed_skew_ahead_are_quarantined():
    bounds = EventTimeBounds.from_config(IngestConfig())
    assert bounds.max_future_ms == 300_000
    soon, tomorrow = good_event(1), good_event(2)
    soon["ts"], tomorrow["ts"] = NOW_MS + 4 * 60_000, NOW_MS + 23 * 3_600_000
    assert check_event(soon, bounds, NOW_MS) is None
    assert check_event(tomorrow, bounds, NOW_MS) == "ts too far in the future"
    parsed = parse_content(lines_of([soon, tomorrow]), bounds, NOW_MS)  # the vectorised path agrees
    assert parsed.valid["event_id"].to_pylist() == ["e1"]
    assert parsed.rejects["reason"].to_pylist() == ["ts too far in the future"]


# -- the job, on Ray --------------------------------------------------------------------------------


@pytest.fixture
def lake(tmp_path: Path, ray_local):
    return tmp_path, tmp_path / "landing"


def test_a_hostile_batch_lands_every_valid_line_and_quarantines_each_bad_file(lake):
    tmp, landing = lake
    cfg = make_config(tmp, "ingest.max_file_bytes=1048576", "ingest.max_decompressed_bytes=4194304",
                      "ingest.batch_rules.action_share_bounds={}")
    expected: set[str] = set()

    def good(prefix: str, n: int) -> list[dict]:
        events = [good_event(i, prefix) for i in range(n)]
        expected.update(e["event_id"] for e in events)
        return events

    write_lines(landing, "a-plain.jsonl", good("a", 40))
    for k, name in enumerate(ODD_NAMES):
        write_lines(landing, name, good(f"odd{k}-", 5))
    (landing / "f-bomb.jsonl.gz").write_bytes(bomb(lines_of(good("bomb", 20)), zeros_mib=256))
    (landing / "g-corrupt.jsonl.gz").write_bytes(os.urandom(5000))
    rng = random.Random(5)
    (landing / "h-binary.jsonl").write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    (landing / "i-huge.jsonl.gz").write_bytes(gzip.compress(b"x" * (3 << 20) + b"\n" + lines_of(good("huge", 1))))
    big = [good_event(i, "big") for i in range(12_000)]
    body, cap, offset = lines_of(big), 1 << 20, 0
    for e in big:  # the lines that fit under the stored cap land (the last one may lack its newline)
        size = len(json.dumps(e))
        if offset + size <= cap:
            expected.add(e["event_id"])
        offset += size + 1
    (landing / "j-big.jsonl").write_bytes(body)
    now = int(time.time() * 1000)
    soon, ahead = good_event(1, "fut"), good_event(2, "fut")
    soon["ts"], ahead["ts"] = now + 60_000, now + 23 * 3_600_000
    expected.add("fut1")
    write_lines(landing, "k-future.jsonl", [soon, ahead])

    report = IngestJob(cfg).run_once()
    events, quarantine = lake_rows(cfg)
    assert report.failed == []
    assert sorted(e["event_id"] for e in events) == sorted(expected)
    file_level = {q["source_file"]: q["reason"] for q in quarantine if q["line_no"] == -1}
    assert file_level["f-bomb.jsonl.gz"] == "content over 4194304 bytes (ingest.max_decompressed_bytes)"
    assert file_level["g-corrupt.jsonl.gz"].startswith("corrupt gzip")
    assert file_level["j-big.jsonl"] == "file over 1048576 bytes (ingest.max_file_bytes)"
    by_file = Counter((q["source_file"], q["reason"].split(":")[0]) for q in quarantine if q["line_no"] >= 0)
    assert by_file[("i-huge.jsonl.gz", f"line over {MAX_LINE_BYTES} bytes")] == 1
    assert by_file[("k-future.jsonl", "ts too far in the future")] == 1
    assert sum(n for (name, _), n in by_file.items() if name == "h-binary.jsonl") >= 1
    audit = audit_lake(cfg)
    assert (audit.lost, audit.duplicated) == (0, 0) and audit.valid == len(expected)


def test_a_planned_batch_whose_file_fails_to_read_is_retried_then_isolated(lake):
    tmp, landing = lake
    cfg = make_config(tmp, "ingest.max_batch_attempts=2")
    write_lines(landing, "a.jsonl", [good_event(i) for i in range(10)])
    write_lines(landing, "b.jsonl", [good_event(i) for i in range(10, 20)])
    job = IngestJob(cfg)
    with job.lease:  # a run that planned batch 1 and died; then b.jsonl vanished
        job._open_lake()
        job._plan_next(job.pending_files([]), 1)
    (landing / "b.jsonl").unlink()

    with pytest.raises(Exception, match=r"b\.jsonl"):
        IngestJob(cfg).run_once()  # try 1 of 2: a read error fails the batch (it may be transient)
    write_lines(landing, "c.jsonl", [good_event(i) for i in range(20, 25)])
    report = IngestJob(cfg).run_once()  # try 2 of 2, the last: the unreadable file is quarantined
    assert [b.batch_no for b in report.batches] == [1, 2]
    events, quarantine = lake_rows(cfg)
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in [*range(10), *range(20, 25)])
    [q] = quarantine
    assert q["source_file"] == "b.jsonl" and q["reason"].startswith("unreadable file: FileNotFoundError")
    audit = audit_lake(cfg)
    assert (audit.lost, audit.duplicated) == (0, 0)


def test_a_batch_that_fails_every_try_stops_with_a_clear_error(lake, monkeypatch):
    tmp, landing = lake
    cfg = make_config(tmp, "ingest.max_batch_attempts=2")
    write_lines(landing, "a.jsonl", [good_event(i) for i in range(10)])

    def lake_down(*args):
        raise OSError("the lake is unreachable")

    monkeypatch.setattr(ingestion.job, "commit_once", lake_down)
    for _ in range(2):
        with pytest.raises(OSError, match="unreachable"):
            IngestJob(cfg).run_once()
    with pytest.raises(BatchFailedError, match=r"batch 1 \(a\.jsonl\) was tried 2 times .* delete .*attempts\.json"):
        IngestJob(cfg).run_once()
    monkeypatch.undo()
    Path(IngestJob(cfg).attempts_uri).unlink()  # what the error tells the operator to do once fixed
    IngestJob(cfg).run_once()
    events, _ = lake_rows(cfg)
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in range(10))


def test_a_plan_another_writer_recorded_first_stops_the_run(tmp_path):
    landing = tmp_path / "landing"
    write_lines(landing, "a.jsonl", [good_event(1)])
    job = IngestJob(make_config(tmp_path))
    with job.lease:
        job._open_lake()
        job._plan_next(job.pending_files([]), 1)
        write_lines(landing, "b.jsonl", [good_event(2)])
        with pytest.raises(PlanConflictError, match="batch 1 was planned by another writer"):
            job._plan_next([("b.jsonl", 1)], 1)  # its listing predates the other plan: same number, other files


def test_two_runs_started_together_land_everything_once(lake):
    tmp, landing = lake
    cfg = make_config(tmp, "ingest.max_batch_bytes=4000", "ingest.lease_wait_s=300")
    for f in range(4):
        write_lines(landing, f"part-{f}.jsonl", [good_event(f * 30 + i) for i in range(30)] + [good_event(f)])
    start = threading.Barrier(2)
    reports = []

    def run() -> None:
        job = IngestJob(cfg)
        start.wait(timeout=60)
        reports.append(job.run_once())

    run_together(run, 2)
    # One run did the work; the other waited for the lease and found nothing left.
    assert sorted(len(r.batches) > 0 for r in reports) == [False, True]
    events, quarantine = lake_rows(cfg)
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in range(120))
    assert [q["reason"] for q in quarantine] == ["duplicate event_id"] * 4
    audit = audit_lake(cfg)
    assert (audit.lines, audit.lost, audit.duplicated) == (124, 0, 0)


# -- S3: odd names and the lease against a real S3 API (moto) ----------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto")
    from ray_jobs.local_cluster import S3Server

    with S3Server(bucket="hostile") as server:
        yield server


def test_odd_file_names_and_the_lease_work_on_s3(s3_server, tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from ingestion.lease import Lease, LeaseHeldError

    cfg = make_config(tmp_path)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    cfg.ingest.landing_dir = f"s3://{s3_server.bucket}/landing"
    fs = pafs.S3FileSystem(endpoint_override=s3_server.url, scheme="http", region="us-east-1",
                           access_key=s3_server.env["AWS_ACCESS_KEY_ID"],
                           secret_key=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    content = {}
    for k, name in enumerate(ODD_NAMES):
        content[name] = lines_of([good_event(i, f"odd{k}-") for i in range(3)])
        with fs.open_output_stream(f"{s3_server.bucket}/landing/{name}") as out:
            out.write(content[name])

    job = IngestJob(cfg)
    assert [name for name, _ in job.pending_files([])] == sorted(ODD_NAMES)
    valid, rejects = parse_landing_files(ODD_NAMES, landing=job.landing_root, bounds=BOUNDS,
                                         now_ms=NOW_MS, limits=job.limits, isolate=False)
    assert (valid.num_rows, rejects.num_rows) == (12, 0)
    assert job._raw_lines(valid.slice(3, 1)) == [content[ODD_NAMES[1]].split(b"\n")[0] + b"\n"]

    folder = f"s3://{s3_server.bucket}/lake/_ingest_control/lease"
    with Lease(folder, ttl_s=60, wait_s=0), pytest.raises(LeaseHeldError):
        Lease(folder, ttl_s=60, wait_s=0).acquire()
    with Lease(folder, ttl_s=60, wait_s=0) as again:
        assert again.generation == 3


@pytest.mark.slow
def test_odd_names_and_a_bomb_end_to_end_on_s3(s3_server, tmp_path, monkeypatch):
    """The whole job in its own process (a fresh Ray that sees the S3 environment): landing, lake and lease on S3."""
    import pyarrow.fs as pafs

    import config
    from bench.crash import run_ingest

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    fs = pafs.S3FileSystem(endpoint_override=s3_server.url, scheme="http", region="us-east-1",
                           access_key=s3_server.env["AWS_ACCESS_KEY_ID"],
                           secret_key=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    root = f"{s3_server.bucket}/e2e"
    files = {name: lines_of([good_event(i, f"odd{k}-") for i in range(5)]) for k, name in enumerate(ODD_NAMES)}
    files["f %23.jsonl.gz"] = gzip.compress(lines_of([good_event(i, "gz") for i in range(5)]))
    files["z-bomb.jsonl.gz"] = bomb(b"", zeros_mib=64)
    for name, data in files.items():
        with fs.open_output_stream(f"{root}/landing/{name}", compression=None) as out:  # stored as given
            out.write(data)
    overrides = [f"lake.root=s3://{root}/lake", f"ingest.landing_dir=s3://{root}/landing", "lake.s3_allow_http=true",
                 f"lake.gx_dir={tmp_path / 'gx'}", "ingest.max_decompressed_bytes=8388608", "ray.num_cpus=2",
                 "ingest.batch_rules.action_share_bounds={}", "ingest.build_data_docs=false"]
    assert run_ingest(overrides) == 0
    cfg = config.load(None, overrides)
    events, quarantine = lake_rows(cfg)
    assert sorted({e["source_file"] for e in events}) == sorted(set(files) - {"z-bomb.jsonl.gz"})
    assert len(events) == 25
    assert {(q["source_file"], q["reason"]) for q in quarantine if q["line_no"] == -1} == \
        {("z-bomb.jsonl.gz", "content over 8388608 bytes (ingest.max_decompressed_bytes)")}
    audit = audit_lake(cfg)
    assert (audit.lost, audit.duplicated) == (0, 0)
