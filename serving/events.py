"""Event intake: validate like ingestion, land the events for the ingestion job, update the real-time features.

Each accepted POST /events is
1. checked event by event with the ingestion contract's row rules (`ingestion.contract.check_event`, the
   same bounds as `ray_jobs.ingest`): one bad event rejects the request (422 naming the event and field);
2. written to the landing folder as one JSON-lines file, atomically: a local folder gets a hidden temp file
   that is renamed once complete (`ingestion.landing.LandingWriter`); object storage gets one PUT, which is
   atomic there. The file is durable before the 202, so ingestion picks every accepted event up;
3. applied to the online store by a `RealtimeFeatureUpdater` (started from the lake, as `ingest --follow
   --push-features` does): the user's next /recommend sees the event in its history.

One replica: the updater must be the single writer of the entities it updates (features/realtime.py), so
do not also run `ray_jobs.ingest --follow --push-features` against the same online store.

>>> from ingestion.contract import EventTimeBounds
>>> bad_field("user_id must be > 0"), bad_field("missing field: ts"), bad_field("unknown action")
('user_id', 'ts', 'action')
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from datetime import datetime
from typing import Any

from ray import serve

import storage
from ingestion.contract import OPTIONAL_FIELDS, REQUIRED_FIELDS, EventTimeBounds, check_event
from serving.common import platform_config

log = logging.getLogger("ray.serve")


def bad_field(reason: str) -> str:
    """The event field a `check_event` reason is about (the first field name it mentions)."""
    words = reason.replace(":", " ").split()
    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        if name in words:
            return name
    return "action" if "action" in reason else "event"


def write_landing(folder: str, prefix: str, events: list[dict]) -> str:
    """One JSON-lines file holding `events`, appearing whole or not at all; returns its name."""
    if "://" not in folder:
        from ingestion.landing import LandingWriter

        with LandingWriter(folder, prefix=prefix, lines_per_file=len(events) + 1) as writer:
            writer.write_events(events)
        return str(writer.files[-1])
    fs, root = storage.filesystem(folder)
    name = f"{root.rstrip('/')}/{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"
    with fs.open_output_stream(name) as out:  # one PUT: the object exists whole or not at all
        out.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode())
    return f"{folder.split('://')[0]}://{name}"


@serve.deployment
class EventIntake:
    def __init__(self, args: dict[str, Any] | None = None):
        self.cfg = platform_config(args)
        min_ts = datetime.fromisoformat(self.cfg.ingest.min_event_time.replace("Z", "+00:00"))
        self.bounds = EventTimeBounds(min_ts_ms=int(min_ts.timestamp() * 1000),
                                      max_future_ms=self.cfg.ingest.max_future_s * 1000)
        # Unique per process: two writers never race for one landing file name.
        self.prefix = f"{self.cfg.serving.landing_prefix}-{socket.gethostname()}-{os.getpid()}"
        self.updater, self.error = None, None
        self._start_updater()

    def _start_updater(self) -> None:
        try:
            from features.realtime import start_from_lake
            from features.repo import open_store

            self.updater, self.error = start_from_lake(self.cfg, open_store(self.cfg)), None
        except Exception as err:  # events still land; features catch up when the store is back
            self.updater, self.error = None, f"real-time updater: {err}"
            log.error(self.error)

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
        t0 = time.perf_counter()
        landed = write_landing(self.cfg.ingest.landing_dir, self.prefix, events)
        t1 = time.perf_counter()
        if self.updater is None:
            self._start_updater()
        updated = False
        if self.updater is not None:
            try:
                self.updater.update(events)
                updated = True
            except Exception as err:  # landed already: ingestion will still see it
                log.error("real-time feature update failed: %s", err)
                self.updater, self.error = None, f"real-time updater: {err}"
        t2 = time.perf_counter()
        return {"accepted": len(events), "landing_file": landed, "features_updated": updated,
                "timings_ms": {"landing": round((t1 - t0) * 1000, 3), "features": round((t2 - t1) * 1000, 3)}}

    async def check(self) -> list[str]:
        return [self.error] if self.error else []
