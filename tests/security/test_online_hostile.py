"""Hostile or unlucky /events traffic against the intake itself (no Ray, no store: the updater is faked).

The store-side findings (future events and the watermark, duplicates, batch vs real-time rows, readers
beside writers) are checked against SQLite and Redis in tests/features/test_online.py."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time

import pytest

import config
from features.realtime import UpdateReport
from serving.events import EventIntake, LandingFiles


class FakeStarts:
    """Stands in for `start_from_lake`: fails `failures` times, then returns an updater recording events."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: list[tuple[float, str]] = []  # (monotonic time, thread name) of each attempt
        self.applied: list[dict] = []
        self.broken = False

    def __call__(self, cfg, store):
        self.calls.append((time.monotonic(), threading.current_thread().name))
        if len(self.calls) <= self.failures:
            raise ConnectionError("online store unreachable")
        return self

    def update(self, events):
        if self.broken:
            raise ConnectionError("online store went away")
        self.applied += events
        return UpdateReport(events=len(events))


@pytest.fixture
def intake(tmp_path, monkeypatch):
    """An EventIntake on a temp landing folder whose updater starts succeed after `starts.failures` tries."""
    starts = FakeStarts(failures=3)
    monkeypatch.setattr("features.realtime.start_from_lake", starts)
    monkeypatch.setattr("features.repo.open_store", lambda cfg: None)
    monkeypatch.setattr("serving.events.RESTART_BACKOFF_S", (0.05, 0.2))
    monkeypatch.setattr(config, "load", lambda path, overrides: config.schema.PlatformConfig(
        ingest={"landing_dir": str(tmp_path / "landing"), "max_future_s": 300}))
    intake = EventIntake.func_or_class({})
    yield intake, starts
    wait_for(lambda: not intake._restarting.locked())  # no restart loop may outlive the fakes


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def event(event_id: str, ts: int) -> dict:
    return {"event_id": event_id, "ts": ts, "user_id": 1, "item_id": 2, "action": "click"}


def test_an_event_beyond_the_allowed_skew_is_rejected_naming_ts(intake):
    intake, _ = intake
    now = int(time.time() * 1000)
    got = asyncio.run(intake.ingest([event("ok", now + 240_000), event("ahead", now + 23 * 3600 * 1000)]))
    assert [p["loc"] for p in got["problems"]] == [["body", 1, "ts"]]
    assert "future" in got["problems"][0]["msg"]
    assert not list(intake.landing.folder.iterdir()), "a rejected request lands nothing"
    assert asyncio.run(intake.ingest([event("ok", now + 240_000)]))["accepted"] == 1


def test_updater_down_restarts_in_the_background_with_backoff(intake):
    intake, starts = intake
    assert intake.updater is None and len(starts.calls) == 1  # the inline start at construction failed
    now = int(time.time() * 1000)
    down = asyncio.run(intake.ingest([event("while-down", now)]))
    assert down["accepted"] == 1 and not down["features_updated"]
    assert all(name != threading.current_thread().name for _, name in starts.calls[1:]), "no start per request"

    wait_for(lambda: intake.updater is not None)
    gaps = [b[0] - a[0] for a, b in zip(starts.calls, starts.calls[1:])]
    assert len(gaps) == 3 and gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # doubled each time
    assert asyncio.run(intake.ingest([event("back", now)]))["features_updated"]
    assert [e["event_id"] for e in starts.applied] == ["back"]

    starts.broken, attempts = True, len(starts.calls)
    assert not asyncio.run(intake.ingest([event("broke", now)]))["features_updated"]
    assert len(starts.calls) == attempts  # the failed request did not rebuild inline...
    starts.broken = False
    wait_for(lambda: intake.updater is not None)  # ...a background restart did
    assert len(starts.calls) == attempts + 1
    landed = sorted(p.name for p in intake.landing.folder.iterdir())
    assert len(landed) == 3 and not [n for n in landed if n.startswith(".")]


def test_requests_that_arrive_together_share_one_landing_file_and_each_is_acknowledged(intake):
    intake, starts = intake
    wait_for(lambda: intake.updater is not None)
    now = int(time.time() * 1000)

    async def post_together():
        return await asyncio.gather(*(intake.ingest([event(f"g{i}-{k}", now) for k in range(i + 1)])
                                      for i in range(20)))

    answers = asyncio.run(post_together())
    assert [a["accepted"] for a in answers] == [i + 1 for i in range(20)]
    landed = [json.loads(line)["event_id"] for path in intake.landing.folder.iterdir()
              for line in path.read_text().splitlines()]
    expected = [f"g{i}-{k}" for i in range(20) for k in range(i + 1)]
    assert sorted(landed) == sorted(expected) and len(landed) == len(expected)  # each event once
    assert len(list(intake.landing.folder.iterdir())) < 20, "no group commit: one file per request"
    assert [e["event_id"] for e in starts.applied] == expected  # applied once each, in arrival order


def test_next_landing_file_needs_no_listing_and_is_durable(tmp_path, monkeypatch):
    folder = tmp_path / "landing"
    folder.mkdir()
    (folder / "p-000007.jsonl").write_text("{}\n")
    (folder / "other-000099.jsonl").write_text("{}\n")
    files = LandingFiles(str(folder), "p")

    def no_listing(*args):
        raise AssertionError("the landing folder was listed after start-up")

    synced_dirs = []
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_dirs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "listdir", no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr(os, "fsync", fsync)
    names = [os.path.basename(files.write([event(f"e{i}", 1)])) for i in range(3)]
    assert names == ["p-000008.jsonl", "p-000009.jsonl", "p-000010.jsonl"]
    assert len(synced_dirs) == 3, "the folder is fsynced after each link"
    monkeypatch.undo()
    assert json.loads((folder / "p-000010.jsonl").read_text())["event_id"] == "e2"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_a_taken_landing_name_fails_without_touching_the_existing_file(tmp_path):
    files = LandingFiles(str(tmp_path), "p")
    (tmp_path / "p-000001.jsonl").write_text("someone else's\n")  # appeared after start-up
    with pytest.raises(FileExistsError):
        files.write([event("mine", 1)])
    assert (tmp_path / "p-000001.jsonl").read_text() == "someone else's\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p-000001.jsonl"]
    assert files.write([event("mine", 1)]).endswith("p-000002.jsonl")  # the next call moves on
