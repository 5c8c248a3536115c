"""Synthetic live-stream interaction logs: the platform's default dataset (docs/design.md, "Datasets").

    python -m ingestion.simulator --config embedded --set simulator.events=1000000 --out data/landing

Writes contract events as JSON-lines files into a landing folder (atomically, via `LandingWriter`),
optionally with extra malformed lines mixed in, and next to them, under `simulator.oracle_dir`:
- `p_click.parquet`: every impression's TRUE click probability (event_id, ts, request_id, user_id,
  item_id, position, p_click, clicked, and each term of the click logit as `<term>_logit`), so the best possible
  AUC is known (`oracle_auc`) and what a model learned of each term can be measured
  (`training.oracle.click_logit_terms`). `clicked` is the drawn outcome: in the last seconds of the stream a
  drawn click can fall after the log's end;
- `items.parquet`: item_id, author_id, kind (live/video), topic, popularity;
- `summary.json`: what was written (also returned by `simulate` and printed by the CLI).

The world (users, streamers, policy, click model) is in `ingestion.simulator_world`. Events are
simulated in steps of up to `MAX_STEP_S` simulated seconds, held back until their time has come (a view is
logged when the watching ends), so the files are in event-time order; they are formatted in chunks
with Arrow string kernels, which is what makes the simulator fast. Same seed => byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import storage
from config import add_config_args, from_args
from config.schema import SimulatorConfig
from ingestion.contract import ACTION_INDEX, ACTIONS, REQUIRED_FIELDS
from ingestion.landing import LandingWriter
from ingestion.simulator_world import LOGIT_TERMS, World, concat_events, take_events

# A step simulates ~TARGET_REQUESTS requests at once (numpy cost is per step, so fewer, fuller steps are
# faster), but never more than MAX_STEP_S of simulated time: the momentum window is 5 minutes.
TARGET_REQUESTS = 256
MIN_STEP_S, MAX_STEP_S = 5.0, 120.0
CHUNK_EVENTS = 65_536  # events formatted and written at once
IMPRESSION = ACTION_INDEX["impression"]
ACTION_NAMES = pa.array(ACTIONS)
FAR_FUTURE_MS = 100 * 365 * 86400 * 1000

# Injected lines, one kind drawn uniformly per line. All but "duplicate" break a row rule or JSON;
# "duplicate" re-sends an earlier line unchanged (at-least-once delivery), which dedup must absorb.
MALFORMED_KINDS = ("broken_json", "truncated", "missing_field", "wrong_type", "negative_id",
                   "unknown_action", "nan_value", "future_ts", "duplicate")

ORACLE_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", pa.int64()), ("request_id", pa.string()), ("user_id", pa.int64()),
    ("item_id", pa.int64()), ("position", pa.int8()), ("p_click", pa.float64()), ("clicked", pa.bool_()),
    # The click logit's terms at the impression (simulator_world.LOGIT_TERMS; logit(p_click) = bias + their sum).
    # The hidden hype (an OU process with a 20-minute memory that no feature shows directly) among them:
    # sigmoid(logit(p_click) - hype_logit) is the ceiling of a model blind to it.
    *((f"{term}_logit", pa.float64()) for term in LOGIT_TERMS),
])


def parse_time_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def _strings(a: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(a), pa.string())


class _Chunk:
    """A run of emitted events, formatted as contract JSON lines (one Arrow string per line)."""

    def __init__(self, ev: dict, first_no: int, prefix: str, start_ms: int, item_author: np.ndarray):
        self.ev = ev
        self.ts = start_ms + np.floor(ev["t"] * 1000).astype(np.int64)
        # Prefixing by replacing an empty slice is several times faster than a join.
        numbers = first_no + np.arange(len(self.ts))
        self.event_id = pc.utf8_replace_slice(_strings(numbers), 0, 0, f"{prefix}-")
        self.request_id = pc.utf8_replace_slice(_strings(ev["request"]), 0, 0, f"{prefix}-r")
        value = pc.cast(pa.array(ev["value"], from_pandas=True), pa.string())  # NaN -> null -> no field
        value_part = pc.binary_join_element_wise(',"value":', value, "")
        self.lines = pc.binary_join_element_wise(
            '{"event_id":"', self.event_id, '","ts":', _strings(self.ts),
            ',"user_id":', _strings(ev["user"] + 1), ',"item_id":', _strings(ev["item"] + 1),
            ',"author_id":', _strings(item_author[ev["item"]] + 1),
            ',"request_id":"', self.request_id, '","action":"', ACTION_NAMES.take(pa.array(ev["action"] - 1)),
            '"', value_part, "}\n", "", null_handling="skip")

    def oracle(self) -> pa.Table:
        imp = np.flatnonzero(self.ev["action"] == IMPRESSION)
        ev = self.ev
        return pa.table([
            self.event_id.take(imp), pa.array(self.ts[imp]), self.request_id.take(imp),
            pa.array(ev["user"][imp] + 1), pa.array(ev["item"][imp] + 1), pa.array(ev["position"][imp]),
            pa.array(ev["p_click"][imp].astype(np.float64)), pa.array(ev["clicked"][imp]),
            *(pa.array(ev["terms"][imp, i].astype(np.float64)) for i in range(len(LOGIT_TERMS))),
        ], schema=ORACLE_SCHEMA)


def _malformed(kind: str, line: str, bad_id: str, rng: np.random.Generator) -> str:
    """A line the ingestion job must quarantine (or, for "duplicate", dedup), built from a valid one."""
    if kind == "duplicate":
        return line
    if kind == "truncated":
        return line[: len(line) // 2]
    if kind == "broken_json":
        return line.replace('"ts":', "ts:", 1)
    obj = json.loads(line)
    obj["event_id"] = bad_id
    if kind == "missing_field":
        del obj[REQUIRED_FIELDS[1 + rng.integers(len(REQUIRED_FIELDS) - 1)]]
    elif kind == "wrong_type":
        obj["user_id"] = str(obj["user_id"])
    elif kind == "negative_id":
        obj["item_id"] = -obj["item_id"]
    elif kind == "unknown_action":
        obj["action"] = "purchase"
    elif kind == "nan_value":
        obj["action"], obj["value"] = "view", float("nan")
    elif kind == "future_ts":
        obj["ts"] += FAR_FUTURE_MS
    return json.dumps(obj, separators=(",", ":"))


def _with_malformed(lines: pa.Array, rate: float, rng: np.random.Generator, prefix: str,
                    counts: dict[str, int]) -> tuple[bytes, np.ndarray]:
    """The chunk's bytes and line ends, with about `rate` extra bad lines per valid line inserted."""
    data = lines.buffers()[2]
    offsets = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset: lines.offset + len(lines) + 1]
    body = memoryview(data)[offsets[0]: offsets[-1]]
    offsets = offsets - offsets[0]
    n_bad = rng.binomial(len(lines), rate) if rate > 0 else 0
    if n_bad == 0:
        return body, offsets[1:]
    after = np.sort(rng.integers(0, len(lines), n_bad))  # each bad line follows this valid line
    kinds = rng.integers(len(MALFORMED_KINDS), size=n_bad)
    pieces, bad_lengths, prev = [], [], 0
    for pos, kind in zip(after.tolist(), kinds.tolist()):
        name = MALFORMED_KINDS[kind]
        counts[name] = counts.get(name, 0) + 1
        base = bytes(body[offsets[pos]: offsets[pos + 1] - 1]).decode()
        bad = (_malformed(name, base, f"{prefix}-bad{sum(counts.values())}", rng) + "\n").encode()
        pieces += [body[offsets[prev]: offsets[pos + 1]], bad]
        bad_lengths.append(len(bad))
        prev = pos + 1
    pieces.append(body[offsets[prev]:])
    lengths = np.insert(np.diff(offsets), after + 1, bad_lengths)
    return b"".join(pieces), np.cumsum(lengths)


class _OracleWriter:
    """Appends impression rows to `p_click.parquet` (row group per chunk), renamed into place at the end."""

    def __init__(self, folder: Path):
        self.final = folder / "p_click.parquet"
        self.tmp = folder / ".p_click.parquet.tmp"
        # event_id is unique (a dictionary would not pay); zstd: smaller and faster than the default.
        self.writer = pq.ParquetWriter(self.tmp, ORACLE_SCHEMA, compression="zstd",
                                       use_dictionary=["request_id"])

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self, ok: bool) -> None:
        self.writer.close()
        if ok:
            self.tmp.replace(self.final)
        else:
            self.tmp.unlink(missing_ok=True)


def _items_table(world: World) -> pa.Table:
    return pa.table({
        "item_id": np.arange(1, world.n_items + 1), "author_id": world.item_author + 1,
        "kind": np.where(world.is_live, "live", "video"), "topic": world.item_topic,
        "popularity": world.pop,
    })


def simulate(cfg: SimulatorConfig, out_dir: str | Path, fsync: bool = True) -> dict:
    """Writes `cfg.events` valid events (plus injected lines) into `out_dir`; returns a summary.

    Either folder may be remote (s3://): then everything is written to a local scratch folder first and put
    there file by file (a producer's upload; each object appears whole), landing files after the oracle."""
    targets = {"landing": str(out_dir), "oracle": str(cfg.oracle_dir)}
    if not any(storage.is_remote(t) for t in targets.values()):
        return _simulate(cfg, out_dir, fsync)
    with tempfile.TemporaryDirectory(prefix="simulate-") as scratch:
        local = {k: os.path.join(scratch, k) if storage.is_remote(t) else t for k, t in targets.items()}
        summary = _simulate(cfg.model_copy(update={"oracle_dir": local["oracle"]}), local["landing"], fsync=False)
        for kind in ("oracle", "landing"):
            if storage.is_remote(targets[kind]):
                for name in sorted(os.listdir(local[kind])):
                    storage.upload_file(os.path.join(local[kind], name), storage.join(targets[kind], name))
    return {**summary, "landing_dir": targets["landing"], "oracle_dir": targets["oracle"]}


def _simulate(cfg: SimulatorConfig, out_dir: str | Path, fsync: bool) -> dict:
    began, began_cpu = time.perf_counter(), time.process_time()
    oracle_dir = Path(cfg.oracle_dir)
    oracle_dir.mkdir(parents=True, exist_ok=True)
    start_ms = parse_time_ms(cfg.start)
    # Separate streams: injecting malformed lines never changes the valid events.
    world = World(cfg, np.random.default_rng([cfg.seed, 0]), start_ms / 1000.0)
    bad_rng = np.random.default_rng([cfg.seed, 1])
    prefix = f"sim{cfg.seed}"
    pq.write_table(_items_table(world), oracle_dir / "items.parquet")
    writer = LandingWriter(out_dir, prefix=prefix, lines_per_file=cfg.events_per_file,
                           gzip_files=cfg.gzip, fsync=fsync)
    oracle = _OracleWriter(oracle_dir)
    bad_counts: dict[str, int] = {}
    actions = np.zeros(len(ACTIONS) + 1, np.int64)
    emitted, t, held, ready, n_ready, first_ts, last_ts = 0, 0.0, None, [], 0, None, None

    def flush() -> None:
        nonlocal ready, n_ready, first_ts, last_ts
        chunk = _Chunk(concat_events(ready), emitted - n_ready, prefix, start_ms, world.item_author)
        writer.write_block(*_with_malformed(chunk.lines, cfg.malformed_rate, bad_rng, prefix, bad_counts))
        oracle.write(chunk.oracle())
        first_ts = int(chunk.ts[0]) if first_ts is None else first_ts
        last_ts = int(chunk.ts[-1])
        ready, n_ready = [], 0

    ok = False
    try:
        while emitted < cfg.events:
            step = np.clip(TARGET_REQUESTS / world.expected_requests_per_s(t), MIN_STEP_S, MAX_STEP_S)
            new = world.step(t, t + step)
            t += step
            held = new if held is None else concat_events([held, new])
            # Emit what has happened by now, in time order; keep later events (ends of views...).
            due = np.flatnonzero(held["t"] < t)
            due = due[np.argsort(held["t"][due], kind="stable")][: cfg.events - emitted]
            out = take_events(held, due)
            held = take_events(held, np.flatnonzero(held["t"] >= t))
            ready.append(out)
            n_ready += len(due)
            emitted += len(due)
            actions += np.bincount(out["action"], minlength=len(actions))
            if n_ready >= CHUNK_EVENTS or (emitted >= cfg.events and n_ready):
                flush()
        writer.close()
        ok = True
    finally:
        oracle.close(ok)
        if not ok:
            writer.abort()
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
    counts = {name: int(actions[ACTION_INDEX[name]]) for name in ACTIONS if actions[ACTION_INDEX[name]]}
    summary = {
        "valid_events": emitted,
        "malformed_lines": sum(v for k, v in bad_counts.items() if k != "duplicate"),
        "duplicate_lines": bad_counts.get("duplicate", 0),
        "malformed_by_kind": dict(sorted(bad_counts.items())),
        "lines": writer.lines_written,
        "files": [p.name for p in writer.files],
        "actions": counts,
        "requests": world.n_requests,  # simulated (the last few may be cut off by the event count)
        "ctr": counts.get("click", 0) / max(counts.get("impression", 0), 1),
        "first_ts": first_ts, "last_ts": last_ts,
        "simulated_hours": t / 3600.0,
        "landing_dir": str(out_dir), "oracle_dir": str(oracle_dir),
        "seconds": round(seconds, 3), "events_per_s": round(emitted / max(seconds, 1e-9)),
        # CPU time too: on a shared machine wall-clock throughput says more about the neighbours.
        "cpu_seconds": round(cpu_seconds, 3), "events_per_cpu_s": round(emitted / max(cpu_seconds, 1e-9)),
    }
    # Timings and folders differ run to run; the summary file keeps only the reproducible fields.
    varying = ("seconds", "events_per_s", "cpu_seconds", "events_per_cpu_s", "landing_dir", "oracle_dir")
    stable = {k: v for k, v in summary.items() if k not in varying}
    (oracle_dir / "summary.json").write_text(json.dumps(stable, indent=1) + "\n")
    return summary


# -- the oracle: the best AUC any model could reach on these impressions ---------------------
def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC from ranks (ties get their average rank); NaN when one class is absent."""
    labels = np.asarray(labels, bool)
    _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((avg_rank[inverse][labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def read_oracle(oracle_dir: str | Path) -> pd.DataFrame:
    fs, path = storage.filesystem(storage.join(str(oracle_dir), "p_click.parquet"))
    return pq.read_table(path, filesystem=fs).to_pandas()


def oracle_auc(oracle_dir: str | Path, events: pd.DataFrame | Iterable[dict] | None = None,
               since_ts_ms: int | None = None) -> float:
    """AUC of the true p_click against clicks, over impressions at or after `since_ts_ms`.

    With `events` (event dicts, or a frame with action / request_id / item_id, e.g. the `events`
    table), an impression counts as clicked when a click with its request_id and item_id is among
    them; without, the oracle's own `clicked` column is used.
    """
    oracle = read_oracle(oracle_dir)
    if since_ts_ms is not None:
        oracle = oracle[oracle["ts"] >= since_ts_ms]
    labels = oracle["clicked"].to_numpy()
    if events is not None:
        frame = events if isinstance(events, pd.DataFrame) else pd.DataFrame(list(events))
        clicks = frame.loc[frame["action"] == "click", ["request_id", "item_id"]].drop_duplicates()
        clicks = clicks.astype({"item_id": "int64"}).assign(_clicked=True)
        labels = oracle.merge(clicks, on=["request_id", "item_id"], how="left")["_clicked"].notna().to_numpy()
    return auc(labels, oracle["p_click"].to_numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingestion.simulator", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--out", default=None, help="landing folder (default: ingest.landing_dir)")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync per file (faster, less durable)")
    args = parser.parse_args(argv)
    cfg = from_args(args)
    try:
        summary = simulate(cfg.simulator, args.out or cfg.ingest.landing_dir, fsync=not args.no_fsync)
    except ValueError as err:  # a world that cannot be simulated: say which setting
        parser.error(str(err))
    summary["files"] = len(summary["files"])
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
