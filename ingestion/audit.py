"""Audit the lake against the landing folder: is every input line in exactly one table, once?

    python -m ingestion.audit --config embedded

The check behind the exactly-once promise, used by tests and `bench/ingest`'s kill/re-run trials,
and by operators after an incident. A line is identified by (file, byte offset); it must appear
once in `events` or once in `events_quarantine`, and no event_id may appear twice in `events`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass

import pyarrow.compute as pc
from deltalake import DeltaTable

import config
import storage
from config.schema import PlatformConfig
from ingestion.parse import FileContent, FileLimits, chunk_line_offsets, line_chunks, read_stored


@dataclass
class AuditReport:
    lines: int  # lines in the landing files that the lake has planned
    valid: int
    quarantined: int
    lost: int  # lines in neither table
    duplicated: int  # lines placed more than once, plus repeated event_ids in `events`

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0


def audit_lake(cfg: PlatformConfig) -> AuditReport:
    opts = cfg.lake.storage_options or None
    events = DeltaTable(cfg.lake.events, storage_options=opts).to_pyarrow_table(
        columns=["event_id", "source_file", "source_offset"])
    quarantine = DeltaTable(cfg.lake.quarantine, storage_options=opts).to_pyarrow_table(
        columns=["source_file", "source_offset", "line_no", "reason"])
    planned = DeltaTable(cfg.lake.ingest_batches, storage_options=opts).to_pyarrow_table(columns=["files"])
    lines = quarantine.filter(pc.greater_equal(quarantine["line_no"], 0))
    placed = Counter(zip(events["source_file"].to_pylist(), events["source_offset"].to_pylist()))
    placed.update(zip(lines["source_file"].to_pylist(), lines["source_offset"].to_pylist()))
    duplicated = sum(n - 1 for n in placed.values() if n > 1)
    duplicated += events.num_rows - len(pc.unique(events["event_id"]))

    # Files the job could not read at all are quarantined whole (one file-level row): no lines to place.
    unreadable = {q["source_file"] for q in quarantine.filter(pc.less(quarantine["line_no"], 0)).to_pylist()
                  if q["reason"].startswith("unreadable file")}

    # The lines are counted as the job cut them: same streaming reader, same caps.
    fs, root = storage.filesystem(cfg.ingest.landing_dir)
    limits = FileLimits.from_config(cfg.ingest)
    total = lost = 0
    names = {name for row in planned["files"].to_pylist() for name, _ in json.loads(row)}
    for name in sorted(names - unreadable):
        for chunk in line_chunks(FileContent(name, read_stored(fs, f"{root}/{name}"), limits)):
            offsets = chunk_line_offsets(chunk).tolist()
            total += len(offsets)
            lost += sum(1 for off in offsets if (name, off) not in placed)
    return AuditReport(total, events.num_rows, quarantine.num_rows, lost, duplicated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    report = audit_lake(config.from_args(parser.parse_args(argv)))
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
