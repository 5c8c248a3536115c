"""Kill the ingestion process at random moments, run it again: every line lands exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ingestion.contract import EventTimeBounds, check_event
from ingestion.parse import line_starts
from tests.ingestion.lake_checks import good_event, lake_rows, make_config, write_lines

REPO = Path(__file__).resolve().parents[2]


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


def run_ingest(tmp: Path, kill_after: float | None) -> int | None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "ray_jobs.ingest", "--once", "--set", f"lake.root={tmp / 'lake'}",
           "--set", f"ingest.landing_dir={tmp / 'landing'}", "--set", "ingest.max_batch_bytes=20000",
           "--set", "ingest.build_data_docs=false", "--set", "ray.num_cpus=2"]
    # A new session so that the kill takes Ray's own processes down with the driver.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def assert_exactly_once(tmp: Path, valid_ids: set[str], total_lines: int) -> None:
    cfg = make_config(tmp)
    events, quarantine = lake_rows(cfg)
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)), "duplicated rows after kill and re-run"
    assert set(ids) == valid_ids, "lost valid rows after kill and re-run"
    placed = [(e["source_file"], e["source_offset"]) for e in events] + \
             [(q["source_file"], q["source_offset"]) for q in quarantine]
    assert len(placed) == len(set(placed)) == total_lines
    for path in (tmp / "landing").glob("*.jsonl"):
        offsets = {o for f, o in placed if f == path.name}
        assert offsets == set(line_starts(path.read_bytes()).tolist())


@pytest.mark.slow
def test_kill_at_random_points_then_rerun(tmp_path):
    valid_ids, total = build_landing(tmp_path / "landing", files=30, lines_per_file=120, seed=3)
    rng = random.Random(11)
    kills = 0
    for _ in range(6):
        # Ray and GX take several seconds to start; kill anywhere from start-up to the last commits.
        if run_ingest(tmp_path, kill_after=rng.uniform(4.0, 40.0)) is None:
            kills += 1
    assert run_ingest(tmp_path, kill_after=None) == 0
    assert kills >= 5, f"only {kills} runs were killed before finishing"
    assert_exactly_once(tmp_path, valid_ids, total)
    # A further run finds nothing to do and changes nothing.
    assert run_ingest(tmp_path, kill_after=None) == 0
    assert_exactly_once(tmp_path, valid_ids, total)
