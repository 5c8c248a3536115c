"""The ingestion job: landing JSON-lines files -> parse (Ray tasks or threads) -> GX gate -> Delta, exactly once.

One run handles the landing files it has not seen, in name order, in batches of about
`ingest.max_batch_bytes`. Per batch:

1. Plan: append (batch_no, files, now) to the `_ingest_batches` Delta table. The plan is the
   write-ahead record: a batch is redone from its plan, never re-planned, so a replay reads the
   same files with the same clock and produces the same rows.
2. Parse the files, one task per file: in Ray tasks on a cluster, in the driver's threads on one machine
   (`ingest.parse_on`; `ingestion.staging.parse_on` says why). Each task writes its valid rows as uncommitted data files
   of `events` and sends back keys and statistics, not rows (`ingestion.staging`). De-duplicate
   event_ids (first occurrence in the lake or in the batch wins; `ingestion.dedup`; a file with
   duplicates has its data files written again without them), run the Great Expectations gate on the
   batch's statistics (`ingestion.expectations`). While the files parse, the run's own thread opens the GX
   project (first batch only) and a thread reads the lake's keys the index lacks.
3. Commit the data files to `events` (none when the gate failed), then append rejects to
   `events_quarantine`. Each commit carries the Delta application transaction (app, batch_no) in its
   own atomic commit and is skipped when the table already holds that batch (see `ingestion.lake`).

A run first finishes the last planned batch if a crash left it half-committed. Killing the job at
any moment and running it again therefore leaves every input line in exactly one table, once.
Landing files are immutable once they appear under their final name (producers write a temp
name and rename): a changed file under a known name is not read again.

Hostile input stays contained: a file is read streaming within `ingest.max_file_bytes` and
`ingest.max_decompressed_bytes`, and what cannot be read becomes quarantine rows for that file (see
`ingestion.parse`). Each try of a batch is counted in the lake; the last allowed try
(`ingest.max_batch_attempts`) quarantines any file that still fails to read, and a batch that fails even
then stops the run with `BatchFailedError` instead of being retried forever. One run at a time works on a
lake: the run holds the lake's lease (`ingestion.lease`) while it plans and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

import storage
from config.schema import PlatformConfig
from ingestion.batch_stats import batch_statistics, repeated_ids
from ingestion.contract import EVENTS_PARTITION_BY, EVENTS_SCHEMA, QUARANTINE_SCHEMA, TS_TYPE, EventTimeBounds
from ingestion.dedup import EventKeyIndex, SortedHashes
from ingestion.expectations import ExpectationGate
from ingestion.lake import append_once, commit_once, committed_version, open_or_create
from ingestion.lease import Lease
from ingestion.parse import REJECT_FILE_SCHEMA, FileLimits, read_lines_at, read_stored
from ingestion.staging import (
    RayStager,
    StagedFile,
    Staging,
    ThreadStager,
    delete_data_files,
    parse_on,
    restage_without,
)

log = logging.getLogger("ingestion")

BATCHES_SCHEMA = pa.schema([
    pa.field("batch", pa.int64(), nullable=False),
    pa.field("files", pa.string(), nullable=False),  # JSON list of [name, size]
    pa.field("now_ms", pa.int64(), nullable=False),
    pa.field("planned_at", TS_TYPE, nullable=False),
])


# Reasons whose text after the colon is detail (grouped by prefix in reports).
_DETAILED_REASONS = ("malformed JSON", "corrupt gzip", "batch expectation", "unreadable file")


class BatchFailedError(RuntimeError):
    """A planned batch failed on every allowed try; the run stops rather than retry it forever."""


class PlanConflictError(RuntimeError):
    """Another writer planned the same batch number: two runs are working on one lake."""


@dataclass
class BatchPlan:
    batch_no: int
    files: list[tuple[str, int]]  # (name relative to the landing folder, size in bytes)
    now_ms: int

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


@dataclass
class BatchReport:
    batch_no: int
    files: int
    lines: int
    valid: int
    quarantined: int
    reasons: dict[str, int]
    failed_expectations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step, for tuning


@dataclass
class RunReport:
    batches: list[BatchReport] = field(default_factory=list)
    docs_path: str | None = None

    @property
    def failed(self) -> list[str]:
        return [name for b in self.batches for name in b.failed_expectations]

    def totals(self) -> dict[str, int]:
        keys = ("files", "lines", "valid", "quarantined")
        return {k: sum(getattr(b, k) for b in self.batches) for k in keys}


class IngestJob:
    """Runs ingestion batches against one lake. Ray must already be initialised.

        job = IngestJob(config.load()); report = job.run_once()   # see ray_jobs.ingest
    """

    def __init__(self, cfg: PlatformConfig):
        self.cfg = cfg
        landing = cfg.ingest.landing_dir.rstrip("/")
        # Absolute, because Ray workers do not share the driver's working directory.
        self.landing_root = landing if storage.is_remote(landing) else storage.local_path(landing)
        events = cfg.lake.events
        self.events_uri = events if storage.is_remote(events) else storage.local_path(events)
        self.fs, self.landing = storage.filesystem(self.landing_root)
        self.bounds = EventTimeBounds.from_config(cfg.ingest)
        self.limits = FileLimits.from_config(cfg.ingest)
        control = storage.join(cfg.lake.root, "_ingest_control")
        self.lease = Lease(storage.join(control, "lease"), cfg.ingest.lease_ttl_s, cfg.ingest.lease_wait_s,
                           cfg.lake.storage_options)
        # Tries of the last planned batch (only the last plan can be unfinished): {"batch", "attempts"}.
        self.attempts_uri = storage.join(control, "attempts.json")
        self._opened = False

    def _open_lake(self) -> None:
        """Create or open the tables and the GX project; under the lease, so concurrent first runs do not race."""
        if self._opened:
            return
        self.stager = RayStager() if parse_on(self.cfg) == "ray" else ThreadStager(self.cfg.ray.num_cpus)
        opts = self.cfg.lake.storage_options
        self.events = open_or_create(self.cfg.lake.events, EVENTS_SCHEMA, EVENTS_PARTITION_BY, opts)
        self.quarantine = open_or_create(self.cfg.lake.quarantine, QUARANTINE_SCHEMA, None, opts)
        self.batches = open_or_create(self.cfg.lake.ingest_batches, BATCHES_SCHEMA, None, opts)
        self.gate: ExpectationGate | None = None  # opened by the first batch, while its files parse
        self.key_index = EventKeyIndex(self.events)
        self._known_plans: tuple[int, list[BatchPlan]] | None = None  # (batches table version, its plans)
        self._opened = True

    # -- attempts -------------------------------------------------------------------------
    def _attempts(self, batch_no: int) -> int:
        if not storage.exists(self.attempts_uri):
            return 0
        record = storage.read_json(self.attempts_uri)
        return record["attempts"] if record["batch"] == batch_no else 0

    # -- planning ---------------------------------------------------------------------------
    def _plans(self) -> list[BatchPlan]:
        """Every recorded batch plan. The table is read again only when its version moved past what this job
        knows (a --follow job polls every fraction of a second, and the table grows by a file per batch)."""
        self.batches.update_incremental()
        version = self.batches.version()
        if self._known_plans is None or self._known_plans[0] != version:
            rows = self.batches.to_pyarrow_table().sort_by("batch").to_pylist()
            self._known_plans = (version, [BatchPlan(r["batch"], [tuple(f) for f in json.loads(r["files"])],
                                                     r["now_ms"]) for r in rows])
        return list(self._known_plans[1])

    def pending_files(self, plans: list[BatchPlan]) -> list[tuple[str, int]]:
        """Landing files that no batch plan names yet, in name order."""
        seen = {name for plan in plans for name, _ in plan.files}
        infos = self.fs.get_file_info(pafs.FileSelector(self.landing, recursive=False, allow_not_found=True))
        files = []
        for info in infos:
            name = info.base_name
            if info.type != pafs.FileType.File or name.startswith("."):
                continue
            if any(fnmatch(name, pat) for pat in self.cfg.ingest.file_patterns) and name not in seen:
                files.append((name, info.size))
        return sorted(files)

    def _plan_next(self, files: list[tuple[str, int]], batch_no: int) -> BatchPlan:
        chosen, total = [], 0
        for name, size in files:
            if chosen and total + size > self.cfg.ingest.max_batch_bytes:
                break
            chosen.append((name, size))
            total += size
        plan = BatchPlan(batch_no, chosen, int(time.time() * 1000))
        row = pa.table({"batch": [batch_no], "files": [json.dumps(chosen)], "now_ms": [plan.now_ms],
                        "planned_at": pa.array([plan.now_ms * 1000], TS_TYPE)}, schema=BATCHES_SCHEMA)
        known = self._known_plans
        if not append_once(self.batches, row, BATCHES_SCHEMA, batch_no):
            # Running our plan now would read other files than the recorded one under the same number.
            raise PlanConflictError(f"batch {batch_no} was planned by another writer while this run held the "
                                    "lease: two ingestion runs are working on one lake; this run stops")
        self.batches.update_incremental()
        # Our own commit, right after the version we had read: the known plans plus this one (else: read again).
        self._known_plans = ((self.batches.version(), [*known[1], plan])
                             if known is not None and self.batches.version() == known[0] + 1 else None)
        return plan

    # -- one batch --------------------------------------------------------------------------
    def _start_staging(self, plan: BatchPlan, isolate: bool) -> Staging:
        # One task per file, results in plan order: with the parser keeping line order within a file,
        # "first occurrence wins" in de-duplication means first in (file, line) order. Plain Ray tasks, not Ray
        # Data: a Dataset execution costs 1-4 s of planning and operator start-up per batch, more than parsing a
        # million events, and a batch is a handful of files with nothing to stream or fuse.
        options = {"landing": self.landing_root, "bounds": self.bounds, "now_ms": plan.now_ms,
                   "limits": self.limits, "isolate": isolate}
        return self.stager.start([name for name, _ in plan.files], options, self.events_uri, plan.batch_no)

    def _raw_lines(self, rows: pa.Table) -> list[bytes]:
        """Fetch the original bytes of rows that parsed as valid (to quarantine them)."""
        raws: list[bytes] = [b""] * rows.num_rows
        files = rows["source_file"].to_pylist()
        offsets = rows["source_offset"].to_pylist()
        by_file: dict[str, list[int]] = {}
        for i, name in enumerate(files):
            by_file.setdefault(name, []).append(i)
        for name, idx in by_file.items():
            stored = read_stored(self.fs, f"{self.landing}/{name}")
            for i, line in zip(idx, read_lines_at(name, stored, [offsets[i] for i in idx], self.limits)):
                raws[i] = line
        return raws

    def run_batch(self, plan: BatchPlan, attempt: int = 1) -> BatchReport:
        """Run a planned batch; `attempt` counts the tries of this plan, this one included."""
        self.lease.renew()
        # Counted before the work, so that a try that kills the process counts too.
        storage.write_json(self.attempts_uri, {"batch": plan.batch_no, "attempts": attempt})
        phases: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str, next_phase: str) -> None:
            """Time the step `name` and announce the next (crash trials read the announcements)."""
            nonlocal clock
            now = time.perf_counter()
            phases[name] = round(now - clock, 4)
            clock = now
            log.info("phase %s (batch %d)", next_phase, plan.batch_no)

        log.info("phase parse (batch %d)", plan.batch_no)
        staging = self._start_staging(plan, isolate=attempt >= self.cfg.ingest.max_batch_attempts)
        self.key_index.prefetch(plan.batch_no)  # the lake's keys are read while the files parse
        if self.gate is None:
            # Here, not with the tables: the project's set-up (~0.07 s of Python, and its suite's Data Docs page in a
            # thread) overlaps the parse instead of coming before it. In the run's own thread, so that nothing of it
            # outlives a run that fails: the lease is let go only after the project is written.
            try:
                self.gate = ExpectationGate(self.cfg.lake.gx_root, self.cfg.ingest)
            except BaseException:
                for pending in (staging.result, self.key_index.wait):  # nor do the parse tasks or the index's read
                    with contextlib.suppress(Exception):
                        pending()
                raise
        staged = staging.result()
        lap("parse", "gate")
        rejects = pa.concat_tables([f.rejects for f in staged]) if staged else REJECT_FILE_SCHEMA.empty_table()
        file_level = pc.sum(pc.equal(rejects["line_no"], -1)).as_py() or 0  # one reject per unreadable file
        lines = sum(f.keys.num_rows for f in staged) + rejects.num_rows - file_level
        staged, duplicates, (ids, hashes) = self._drop_duplicates(staged, plan.batch_no)
        if duplicates.num_rows:
            rejects = pa.concat_tables([rejects, self._as_rejects(duplicates, "duplicate event_id")])
        lap("dedup", "gate")
        statistics = batch_statistics([f.statistics for f in staged], repeated_ids(ids, hashes), self.cfg.ingest)
        gate = self.gate.validate(statistics, plan.batch_no, self.bounds, plan.now_ms)
        data_files = [a for f in staged for a in f.data_files]
        valid = len(ids)
        if not gate.success:
            reason = "batch expectation failed: " + "; ".join(gate.failed)
            if valid:
                kept = pa.concat_tables([f.keys for f in staged])
                rejects = pa.concat_tables([rejects, self._as_rejects(kept, reason)])
            delete_data_files(data_files, self.events_uri)
            data_files, hashes, valid = [], SortedHashes.concat([]), 0
        self.gate.start_docs()
        lap("expectations", "commit_events")
        if not commit_once(self.events, data_files, EVENTS_SCHEMA, plan.batch_no, EVENTS_PARTITION_BY):
            delete_data_files(data_files, self.events_uri)  # an earlier try committed the batch: these are spare
        self.key_index.committed(hashes, plan.batch_no)  # also when an earlier try committed them
        lap("write_events", "commit_quarantine")
        append_once(self.quarantine, self._to_quarantine(rejects, plan), QUARANTINE_SCHEMA, plan.batch_no)
        lap("write_quarantine", "committed")
        reasons: dict[str, int] = {}
        for r in rejects["reason"].to_pylist():
            key = r.split(":", 1)[0] if r.startswith(_DETAILED_REASONS) else r
            reasons[key] = reasons.get(key, 0) + 1
        return BatchReport(plan.batch_no, len(plan.files), lines, valid, rejects.num_rows, reasons,
                           gate.failed, sum(phases.values()), phases)

    @staticmethod
    def _ids_and_hashes(staged: list[StagedFile]) -> tuple[pa.ChunkedArray, SortedHashes]:
        # Chunk by chunk: pa.chunked_array over ChunkedArrays would convert them through Python (0.4 s per 1M ids).
        return (pa.chunked_array([c for f in staged for c in f.keys["event_id"].chunks], pa.string()),
                SortedHashes.concat([f.hashes for f in staged]))

    def _drop_duplicates(self, staged: list[StagedFile], batch_no: int):
        """(the files without the rows whose event_id the lake or an earlier row holds, the dropped rows' keys,
        (ids, hashes) of the rows kept)."""
        ids, hashes = self._ids_and_hashes(staged)
        dup = self.key_index.duplicates(ids, batch_no, hashes)
        if not dup.any():
            return staged, pa.table({}), (ids, hashes)
        dropped, kept, start = [], [], 0
        for f in staged:
            mine = np.flatnonzero(dup[start:start + f.keys.num_rows])
            start += f.keys.num_rows
            if mine.size:
                dropped.append(f.keys.take(pa.array(mine)))
                f = restage_without(f, mine, self.events_uri, batch_no)
            kept.append(f)
        return kept, pa.concat_tables(dropped), self._ids_and_hashes(kept)

    def _as_rejects(self, rows: pa.Table, reason: str) -> pa.Table:
        """Valid rows -> `REJECT_FILE_SCHEMA` rows with their original bytes and `reason`."""
        return pa.table({"raw": pa.array(self._raw_lines(rows), pa.large_binary()),
                         "source_offset": rows["source_offset"], "line_no": rows["line_no"],
                         "reason": pa.repeat(pa.scalar(reason), rows.num_rows), "source_file": rows["source_file"]},
                        schema=REJECT_FILE_SCHEMA)

    @staticmethod
    def _to_quarantine(rejects: pa.Table, plan: BatchPlan) -> pa.Table:
        n = rejects.num_rows
        return pa.table({
            "raw": rejects["raw"], "source_file": rejects["source_file"],
            "source_offset": rejects["source_offset"], "line_no": rejects["line_no"],
            "reason": rejects["reason"], "ingest_batch": pa.array(np.full(n, plan.batch_no, dtype=np.int64)),
            "ingested_at": pa.array(np.full(n, plan.now_ms * 1000, dtype=np.int64)).cast(TS_TYPE),
        }).cast(QUARANTINE_SCHEMA)

    # -- runs -------------------------------------------------------------------------------
    def recover(self) -> BatchReport | None:
        """Finish the last planned batch if a crash left it uncommitted in either table."""
        plans = self._plans()
        if not plans:
            return None
        last = plans[-1]
        if min(committed_version(self.events), committed_version(self.quarantine)) >= last.batch_no:
            return None
        tried = self._attempts(last.batch_no)
        if tried >= self.cfg.ingest.max_batch_attempts:
            names = ", ".join(name for name, _ in last.files)
            raise BatchFailedError(
                f"batch {last.batch_no} ({names}) was tried {tried} times (ingest.max_batch_attempts) and never "
                "committed; the earlier runs' errors say why. Fix the cause, then delete "
                f"{self.attempts_uri} to allow new tries.")
        log.warning("batch %d was planned but not fully committed: redoing it (try %d of %d)", last.batch_no,
                    tried + 1, self.cfg.ingest.max_batch_attempts)
        return self.run_batch(last, tried + 1)

    def run_once(self) -> RunReport:
        """Ingest every pending file, then return. Batches that fail an expectation are reported."""
        with self.lease:
            return self._run_pending()

    def _run_pending(self, on_batch=None, await_docs: bool = True) -> RunReport:
        """Ingest the pending files; `on_batch(batch)` runs as soon as each batch is committed, before the Data
        Docs of the run are awaited (a follower pushing features must not wait for HTML rendering). Without
        `await_docs` the rendering may go on after the return (the gate's next validation waits for it)."""
        self._open_lake()
        report = RunReport()
        redone = self.recover()
        if redone is not None:
            report.batches.append(redone)
            if on_batch is not None:
                on_batch(redone)
        plans = self._plans()
        pending = self.pending_files(plans)
        next_no = max([p.batch_no for p in plans], default=0) + 1
        while pending:
            plan = self._plan_next(pending, next_no)
            batch = self.run_batch(plan)
            report.batches.append(batch)
            log.info("batch %d: %d files, %d lines -> %d valid, %d quarantined (%.2fs)", batch.batch_no,
                     batch.files, batch.lines, batch.valid, batch.quarantined, batch.seconds)
            if on_batch is not None:
                on_batch(batch)
            taken = {name for name, _ in plan.files}
            pending = [f for f in pending if f[0] not in taken]
            next_no += 1
        if report.batches and await_docs:
            log.info("phase docs")
            report.docs_path = self.gate.finish_docs()
        return report

    def follow(self, max_seconds: float | None = None, on_batch=None,
               stop: threading.Event | None = None) -> RunReport:
        """Poll the landing folder and ingest new files until `max_seconds`, `stop` is set, or KeyboardInterrupt.

        The lease is held the whole time: another run on this lake waits, then fails, meanwhile."""
        report = RunReport()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        stop = stop or threading.Event()
        with self.lease:
            try:
                while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                    self.lease.renew()
                    # Data Docs render while the loop sleeps: a file landing meanwhile waits for the rest of the
                    # render only if it arrives before the render ends, not for a whole render plus a poll.
                    report.batches += self._run_pending(on_batch, await_docs=False).batches
                    if self.gate is not None:  # validations waiting for their render get it once the interval passed
                        self.gate.start_docs()
                    stop.wait(self.cfg.ingest.poll_interval_s)
            except KeyboardInterrupt:
                log.info("follow mode stopped")
            if report.batches:
                report.docs_path = self.gate.finish_docs()
        return report
