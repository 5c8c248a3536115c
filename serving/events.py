"""Event intake: validate like ingestion, land the events for the ingestion job, update the real-time features.

Each accepted POST /events is
1. checked event by event with the ingestion contract's row rules (`ingestion.contract.check_event`, the
   same bounds as `ray_jobs.ingest`; a ts at most `ingest.max_future_s` ahead of this clock): one bad event
   rejects the request (422 naming the event and field);
2. written to the landing folder as one JSON-lines file, shared with the requests that arrived meanwhile
   (group commit), atomically: a local folder gets a hidden temp file, fsynced, then linked to its final
   name and the folder fsynced (`LandingFiles`); object storage gets one PUT, which is atomic there. The
   file is durable before the 202, so ingestion picks every accepted event up;
3. applied to the online store by a `RealtimeFeatureUpdater` (started from the lake, as `ingest --follow
   --push-features` does): the user's next /recommend sees the event in its history. An event_id it applied
   already is counted once. While the updater is down (store unreachable) events still land and get 202
   with features_updated false; a background thread restarts it with exponential backoff, never a request.

One replica: the updater must be the single writer of the entities it updates (features/realtime.py), so
do not also run `ray_jobs.ingest --follow --push-features` against the same online store.

>>> from ingestion.contract import EventTimeBounds
>>> bad_field("user_id must be > 0"), bad_field("missing field: ts"), bad_field("unknown action")
('user_id', 'ts', 'action')
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ray import serve

import storage
from ingestion.contract import OPTIONAL_FIELDS, REQUIRED_FIELDS, EventTimeBounds, check_event
from serving.common import platform_config

log = logging.getLogger("ray.serve")
RESTART_BACKOFF_S = (1.0, 60.0)  # first and longest wait between attempts to restart the real-time updater


def bad_field(reason: str) -> str:
    """The event field a `check_event` reason is about (the first field name it mentions)."""
    words = reason.replace(":", " ").split()
    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        if name in words:
            return name
    return "action" if "action" in reason else "event"


def _jsonl(events: list[dict]) -> bytes:
    return "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()


class LandingFiles:
    """Publishes one JSON-lines file per call into a local landing folder, durably and in O(1).

    Names follow `ingestion.landing.LandingWriter` (`<prefix>-<seq:06d>.jsonl`, published by a no-clobber
    link from a hidden temp file). The folder is listed once, here, to continue after this prefix's
    highest number (a restarted process with the same host and pid must not reuse a name ingestion has
    read); later numbers come from memory, as a folder of a million files would make every call slow."""

    def __init__(self, folder: str, prefix: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.jsonl(\.gz)?")
        self.seq = max((int(m.group(1)) for name in os.listdir(self.folder) if (m := pattern.fullmatch(name))),
                       default=0)

    def write(self, events: list[dict]) -> str:
        self.seq += 1
        final = self.folder / f"{self.prefix}-{self.seq:06d}.jsonl"
        tmp = self.folder / f".{final.name}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(_jsonl(events))
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, final)  # fails rather than overwrite a file another writer published
        finally:
            tmp.unlink(missing_ok=True)
        # The link is a change to the folder: without this fsync a crash after the 202 can lose the name.
        folder = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return str(final)


def write_object(folder: str, prefix: str, events: list[dict]) -> str:
    """One object holding `events` under an object-storage landing folder; returns its URI."""
    fs, root = storage.filesystem(folder)
    name = f"{root.rstrip('/')}/{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"
    with fs.open_output_stream(name) as out:  # one PUT: the object exists whole or not at all
        out.write(_jsonl(events))
    return f"{folder.split('://')[0]}://{name}"


@serve.deployment
class EventIntake:
    def __init__(self, args: dict[str, Any] | None = None):
        self.cfg = platform_config(args)
        self.bounds = EventTimeBounds.from_config(self.cfg.ingest)
        # Unique per process: two writers never race for one landing file name.
        self.prefix = f"{self.cfg.serving.landing_prefix}-{socket.gethostname()}-{os.getpid()}"
        landing = self.cfg.ingest.landing_dir
        self.landing = LandingFiles(landing, self.prefix) if "://" not in landing else None
        self.updater, self.error = None, None
        self._restarting = threading.Lock()
        self._waiting: list[tuple[list[dict], asyncio.Future]] = []  # accepted requests not landed yet
        self._drainer: asyncio.Task | None = None
        if not self._start_updater():
            self._restart_in_background()

    def _start_updater(self) -> bool:
        try:
            from features.realtime import start_from_lake
            from features.repo import open_store

            self.updater, self.error = start_from_lake(self.cfg, open_store(self.cfg)), None
            return True
        except Exception as err:  # events still land; features catch up when the store is back
            self.updater, self.error = None, f"real-time updater: {err}"
            log.error(self.error)
            return False

    def _restart_in_background(self) -> None:
        """Retries `start_from_lake` off the request path, waiting twice as long after each failure: a
        rebuild replays the lake's recent events, so running it per request would stall every request
        and hammer a store that is already down."""
        if not self._restarting.acquire(blocking=False):
            return  # one restart loop at a time

        def loop() -> None:
            try:
                delay = RESTART_BACKOFF_S[0]
                while True:
                    time.sleep(delay)
                    if self._start_updater():
                        return
                    delay = min(2 * delay, RESTART_BACKOFF_S[1])
            finally:
                self._restarting.release()

        threading.Thread(target=loop, name="realtime-updater-restart", daemon=True).start()

    def validate(self, events: list[dict]) -> list[dict]:
        """Problems as FastAPI-style 422 details (empty when every event is valid)."""
        now_ms = int(time.time() * 1000)
        problems = []
        for i, event in enumerate(events):
            reason = check_event(event, self.bounds, now_ms)
            if reason is not None:
                problems.append({"loc": ["body", i, bad_field(reason)], "msg": reason, "type": "contract"})
        return problems

    async def ingest(self, events: list[dict]) -> dict[str, Any]:
        problems = self.validate(events)
        if problems:
            return {"problems": problems}
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((events, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        """Lands and applies the requests that queued meanwhile together, in a thread: the blocking file and
        store writes never hold the replica's event loop, and under load many requests share one fsync'd
        landing file and one store update (group commit) instead of queueing behind each other's."""
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                result = await asyncio.to_thread(self._land_and_apply, [e for events, _ in group for e in events])
            except Exception as err:  # not landed: every request of the group fails (500), none is acknowledged
                for _, done in group:
                    done.set_exception(err)
                continue
            for events, done in group:
                done.set_result({**result, "accepted": len(events), "requests_in_group": len(group)})

    def _land_and_apply(self, events: list[dict]) -> dict[str, Any]:
        t0 = time.perf_counter()
        landed = (self.landing.write(events) if self.landing is not None
                  else write_object(self.cfg.ingest.landing_dir, self.prefix, events))
        t1 = time.perf_counter()
        updater, updated = self.updater, False
        if updater is not None:
            try:
                report = updater.update(events)
                updated = True
                if report.skipped:
                    log.info("real-time features skipped events: %s", report.skipped)
            except Exception as err:  # landed already: ingestion will still see it
                log.error("real-time feature update failed: %s", err)
                self.updater, self.error = None, f"real-time updater: {err}"
                self._restart_in_background()
        t2 = time.perf_counter()
        return {"landing_file": landed, "features_updated": updated,
                "timings_ms": {"landing": round((t1 - t0) * 1000, 3), "features": round((t2 - t1) * 1000, 3)}}

    async def check(self) -> list[str]:
        return [self.error] if self.error else []
