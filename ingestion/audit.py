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
from ingestion.lake import to_uri
from ingestion.parse import decompress, line_starts


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
        columns=["source_file", "source_offset", "line_no"])
    planned = DeltaTable(cfg.lake.ingest_batches, storage_options=opts).to_pyarrow_table(columns=["files"])
    lines = quarantine.filter(pc.greater_equal(quarantine["line_no"], 0))
    placed = Counter(zip(events["source_file"].to_pylist(), events["source_offset"].to_pylist()))
    placed.update(zip(lines["source_file"].to_pylist(), lines["source_offset"].to_pylist()))
    duplicated = sum(n - 1 for n in placed.values() if n > 1)
    duplicated += events.num_rows - len(pc.unique(events["event_id"]))

    fs, root = storage.filesystem(to_uri(cfg.ingest.landing_dir))
    total = lost = 0
    names = {name for row in planned["files"].to_pylist() for name, _ in json.loads(row)}
    for name in sorted(names):
        with fs.open_input_stream(f"{root}/{name}", compression=None) as fh:
            data = fh.read()
        if name.endswith(".gz"):
            data, _ = decompress(data)
        offsets = line_starts(data).tolist()
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
