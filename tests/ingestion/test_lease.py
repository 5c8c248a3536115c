"""The ingestion lease and the race-free append: one writer per lake, one commit per batch (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from ingestion.lake import append_once, committed_version, open_or_create
from ingestion.lease import Lease, LeaseHeldError, LeaseLostError
from tests.threads import run_together

SCHEMA = pa.schema([pa.field("x", pa.int64())])


def test_second_holder_waits_then_fails_clearly_and_gets_it_after_release(tmp_path):
    folder = str(tmp_path / "lease")
    first = Lease(folder, ttl_s=60, wait_s=0)
    first.acquire()
    second = Lease(folder, ttl_s=60, wait_s=0.3)
    with pytest.raises(LeaseHeldError, match=r"another ingestion run holds the lake's lease .*pid \d+"):
        second.acquire()
    first.release()
    with second:
        assert second.generation == 3  # taken, released, taken again: each a new record, none overwritten


def test_a_waiting_run_gets_the_lease_when_the_holder_finishes(tmp_path):
    folder = str(tmp_path / "lease")
    first = Lease(folder, ttl_s=60, wait_s=0)
    first.acquire()
    threading.Timer(0.5, first.release).start()
    with Lease(folder, ttl_s=60, wait_s=10) as second:
        assert second.generation == 3


def test_an_expired_lease_is_taken_over_and_its_late_holder_must_stop(tmp_path):
    folder = str(tmp_path / "lease")
    stale = Lease(folder, ttl_s=0.2, wait_s=0)
    stale.acquire()
    with Lease(folder, ttl_s=60, wait_s=2):  # waits for the expiry, then takes over
        stale.renewed_at = 0  # past a third of its ttl: it renews, and finds the lease gone
        with pytest.raises(LeaseLostError, match=r"ingest\.lease_ttl_s"):
            stale.renew()


def test_a_crashed_holder_on_this_host_does_not_block(tmp_path):
    folder = tmp_path / "lease"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = Lease(str(folder), ttl_s=3600, wait_s=0)
    crashed.holder["pid"] = int(dead.stdout)  # a process that is gone, holding a lease for an hour
    crashed.acquire()
    with Lease(str(folder), ttl_s=60, wait_s=0) as taker:
        assert taker.generation == 2
    assert json.loads((folder / "000000000001.json").read_text())["pid"] == int(dead.stdout)


def test_racing_acquirers_never_both_hold(tmp_path):
    folder = str(tmp_path / "lease")
    holders: list[int] = []
    inside = threading.Lock()

    def contend() -> None:
        with Lease(folder, ttl_s=60, wait_s=30) as lease:
            assert inside.acquire(blocking=False), "two holders at once"
            holders.append(lease.generation)
            inside.release()

    run_together(contend, 6)
    assert len(holders) == 6 and len(set(holders)) == 6


def test_append_once_commits_a_batch_once_under_a_race(tmp_path, monkeypatch):
    import ingestion.lake as lake

    path = str(tmp_path / "t")
    open_or_create(path, SCHEMA)
    # Both writers pass the "not committed yet" check before either writes, and the second writes after the
    # first has committed: the check-then-write race.
    both_checked = threading.Barrier(2)
    first_done = threading.Event()
    real_write = lake.write_deltalake

    def write_after_both_checked(*args, **kwargs):
        if both_checked.wait(timeout=30) == 0:
            try:
                return real_write(*args, **kwargs)
            finally:
                first_done.set()
        first_done.wait(timeout=30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(lake, "write_deltalake", write_after_both_checked)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda x=x: results.append(
        append_once(DeltaTable(path), pa.table({"x": [x]}), SCHEMA, 1))) for x in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert len(DeltaTable(path).to_pyarrow_table()) == 1
    assert committed_version(DeltaTable(path)) == 1
