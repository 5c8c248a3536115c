"""Helpers for ingestion tests: write landing files, read back what the lake holds."""

from __future__ import annotations

import json
from pathlib import Path

from deltalake import DeltaTable

import config
from config.schema import PlatformConfig


def make_config(tmp: Path, *overrides: str) -> PlatformConfig:
    return config.load(None, [f"lake.root={tmp / 'lake'}", f"ingest.landing_dir={tmp / 'landing'}",
                              "ingest.build_data_docs=true", *overrides])


def good_event(i: int, prefix: str = "e") -> dict:
    return {"event_id": f"{prefix}{i}", "ts": 1_767_225_600_000 + i * 1000, "user_id": 1 + i % 17,
            "item_id": 1 + i % 29, "author_id": 1 + i % 5, "request_id": f"r{i // 4}",
            "action": ("impression", "click", "view")[i % 3], "value": 30.0 if i % 3 == 2 else None}


def write_lines(folder: Path, name: str, lines: list[bytes | dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines)
    path = folder / name
    path.write_bytes(body)
    return path


def lake_rows(cfg: PlatformConfig) -> tuple[list[dict], list[dict]]:
    events = DeltaTable(cfg.lake.events).to_pyarrow_table().to_pylist()
    quarantine = DeltaTable(cfg.lake.quarantine).to_pyarrow_table().to_pylist()
    return events, quarantine


def input_line_count(landing: Path) -> int:
    """Lines in the landing files (gzip excluded), as the contract counts them."""
    total = 0
    for path in landing.glob("*.jsonl"):
        data = path.read_bytes()
        total += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return total


def unreferenced_data_files(table_path: str) -> list[str]:
    """Parquet files in a Delta table's folder that its log does not name (what a batch must not leave behind)."""
    named = {Path(uri.removeprefix("file://")).resolve() for uri in DeltaTable(table_path).file_uris()}
    return sorted(str(p) for p in Path(table_path).resolve().rglob("*.parquet")
                  if "_delta_log" not in p.parts and p not in named)
