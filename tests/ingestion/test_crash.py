"""Kill the ingestion process at random moments, run it again: every line lands exactly once."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

import config
from bench.crash import run_ingest
from ingestion.audit import audit_lake
from ingestion.contract import EventTimeBounds, check_event
from tests.ingestion.lake_checks import good_event, lake_rows, write_lines


def build_landing(landing: Path, files: int, lines_per_file: int, seed: int) -> tuple[set[str], int]:
    """Files with ~3% bad lines and ids repeated across files; returns (distinct valid ids, total lines)."""
    rng = random.Random(seed)
    valid_ids: set[str] = set()
    total = 0
    for f in range(files):
        lines: list = []
        for k in range(lines_per_file):
            i = f * lines_per_file + k
            roll = rng.random()
            if roll < 0.01:
                lines.append(b'{"event_id": "broken", "ts": ')
            elif roll < 0.03:
                lines.append({**good_event(i), "user_id": -5})
            elif roll < 0.05 and i > 10:
                lines.append(good_event(rng.randrange(i)))  # a duplicate of an earlier event
            else:
                lines.append(good_event(i))
        for obj in lines:
            if isinstance(obj, dict) and check_event(obj, EventTimeBounds(), int(time.time() * 1000)) is None:
                valid_ids.add(obj["event_id"])
        write_lines(landing, f"part-{f:04d}.jsonl", lines)
        total += len(lines)
    return valid_ids, total


def assert_exactly_once(tmp: Path, overrides: list[str], valid_ids: set[str], total_lines: int) -> None:
    cfg = config.load(None, overrides)
    audit = audit_lake(cfg)
    assert (audit.lines, audit.lost, audit.duplicated) == (total_lines, 0, 0)
    events, _ = lake_rows(cfg)
    assert {e["event_id"] for e in events} == valid_ids, "lost valid rows after kill and re-run"


@pytest.mark.slow
@pytest.mark.parametrize("parse_on", ["threads", "ray"])
def test_kill_at_random_points_then_rerun(tmp_path, parse_on):
    # threads: the job alone; ray: the kill also takes down the Ray workers that parse, as a lost pod would.
    valid_ids, total = build_landing(tmp_path / "landing", files=30, lines_per_file=120, seed=3)

    def overrides(lake: str) -> list[str]:
        return [f"lake.root={tmp_path / lake}", f"ingest.landing_dir={tmp_path / 'landing'}",
                "ingest.max_batch_bytes=20000", "ingest.build_data_docs=false", "ray.num_cpus=2",
                f"ingest.parse_on={parse_on}"]

    # How long a whole run takes on this machine right now: kill times are drawn inside it, so the
    # kills land mid-run whether the machine is idle or busy.
    durations = []
    for reference in ("reference", "reference2"):  # the shorter of two: runs vary with the machine's load
        started = time.monotonic()
        assert run_ingest(overrides(reference)) == 0
        durations.append(time.monotonic() - started)
    duration = min(durations)
    rng = random.Random(11)
    kills = 0
    for trial in range(4):  # a smoke run of the idea: `python -m bench.crash --trials 20` is the full trial
        lake = f"lake{trial}"
        if run_ingest(overrides(lake), kill_after=rng.uniform(0.15, 0.85) * duration) is None:
            kills += 1
        assert run_ingest(overrides(lake)) == 0
        assert_exactly_once(tmp_path, overrides(lake), valid_ids, total)
    assert kills >= 3, f"only {kills} of 4 runs were killed before finishing"
    # A further run finds nothing to do and changes nothing.
    assert run_ingest(overrides("lake0")) == 0
    assert_exactly_once(tmp_path, overrides("lake0"), valid_ids, total)
