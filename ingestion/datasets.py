"""Public datasets -> contract events in a landing folder, plus user/item attribute tables (Parquet).

    python -m ingestion.datasets ml-1m --out data/landing
    python -m ingestion.datasets --format s3rec --path ../shared/datasets/amazon/Beauty.txt --out DIR

Named datasets are read from `datasets.root` (DATASETS below); any file in one of the four formats
works with `--format/--path`, so a new dataset in a known format needs no code change. Attribute
tables go to `<datasets.meta_dir>/<name>/` (users.parquet, items.parquet, where the source has them).

How each format becomes events (choices, as the files carry no more than this):
- `movielens-dat` (`UserID::MovieID::Rating::Timestamp`, seconds) and `recbole` (`.inter` with a typed
  header): one `rate` event per rating, value = stars, ts = the rating time in ms, written in time
  order; event_id `<prefix>-<user>-<item>-<ts>` (one rating per user and item, so it is unique and
  re-converting never duplicates). No author_id: movies have none. A RecBole file without ratings
  gives `click` events; ids that are not positive integers are numbered from 1 in order of appearance.
  Note: ml-100k's ratings are from 1997-98, before the ingestion default `ingest.min_event_time`.
- `s3rec` (`X.txt`: `user item item ...`, 1-based) and `letter` (`X.inter.json`: `{"user": [item, ...]}`,
  0-based): implicit, chronological interactions without timestamps or ratings (reviews / purchases:
  the user chose the item). They become `click` events - the contract's action for "the user chose
  this item" - with no value (no watch time, no stars). Times are ordinal: SEQUENCE_BASE_MS plus
  the position in the user's sequence in seconds, so each user's order is kept (times across users
  mean nothing). LETTER's 0-based user and item ids are shifted by +1 (contract ids are > 0), which
  makes nezha/Beauty's ids equal amazon/Beauty.txt's. event_id `<prefix>-<user>-<position>`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from config import add_config_args, from_args
from ingestion.landing import LandingWriter

SEQUENCE_BASE_MS = 1577836800000  # 2020-01-01T00:00:00Z: ordinal times for sequences without timestamps
SEQUENCE_STEP_MS = 1000


class Adapter:
    """One source file: `events()` streams contract events, `tables()` gives its attribute tables."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix = Path(path), prefix

    def events(self) -> Iterator[dict]:
        raise NotImplementedError

    def tables(self) -> dict[str, pa.Table]:
        return {}

    def _sequence_events(self, sequences: Iterator[tuple[int, list[int]]]) -> Iterator[dict]:
        for user, items in sequences:
            for pos, item in enumerate(items):
                yield {"event_id": f"{self.prefix}-{user}-{pos}", "user_id": user, "item_id": item,
                       "ts": SEQUENCE_BASE_MS + pos * SEQUENCE_STEP_MS, "action": "click"}

    def _rating_events(self, frame: pd.DataFrame) -> Iterator[dict]:
        """frame: user, item, ts (ms) and optionally rating; written in time order."""
        frame = frame.sort_values(["ts", "user", "item"], kind="stable")
        rated = "rating" in frame
        cols = [frame[c].to_numpy().tolist() for c in ("user", "item", "ts")]
        stars = frame["rating"].astype(float).tolist() if rated else [None] * len(frame)
        for user, item, ts, value in zip(*cols, stars):
            event = {"event_id": f"{self.prefix}-{user}-{item}-{ts // 1000}", "ts": ts, "user_id": user,
                     "item_id": item, "action": "rate" if rated else "click"}
            if rated:
                event["value"] = value
            yield event


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    # MovieLens' "::" separator needs pandas' slow python engine; a one-byte tab does not.
    text = path.read_bytes().decode("latin-1").replace("::", "\t")
    return pd.read_csv(io.StringIO(text), sep="\t", header=None, names=names, dtype=str,
                       keep_default_na=False, quoting=3)


class MovieLensDat(Adapter):
    """ratings*.dat, with movies.dat and users.dat from the same folder when present (latin-1)."""

    def events(self) -> Iterator[dict]:
        frame = _read_dat(self.path, ["user", "item", "rating", "ts"]).astype("int64")
        frame["ts"] *= 1000
        return self._rating_events(frame)

    def tables(self) -> dict[str, pa.Table]:
        out = {}
        movies, users = self.path.with_name("movies.dat"), self.path.with_name("users.dat")
        if movies.exists():
            m = _read_dat(movies, ["item_id", "title", "genres"])
            year = m["title"].str.extract(r"\((\d{4})\)\s*$")[0]
            out["items"] = pa.table({
                "item_id": m["item_id"].astype("int64"), "title": m["title"],
                "year": pd.to_numeric(year).astype("Int64"), "genres": m["genres"].str.split("|"),
            })
        if users.exists():
            u = _read_dat(users, ["user_id", "gender", "age", "occupation", "zip"])
            out["users"] = pa.Table.from_pandas(
                u.astype({"user_id": "int64", "age": "int64", "occupation": "int64"}), preserve_index=False)
        return out


class RecBole(Adapter):
    """RecBole atomic files: `X.inter` (+ `X.user`, `X.item`), tab separated, header `name:type`."""

    ID_FIELDS: ClassVar[dict[str, str]] = {"user_id": "user", "item_id": "item"}

    def __init__(self, path: Path, prefix: str):
        super().__init__(path, prefix)
        self.inter = self._read(self.path)
        # Contract ids are positive integers: keep tokens that already are, else number them from 1.
        self.ids = {}
        for field in self.ID_FIELDS:
            tokens = self.inter[field]
            if tokens.str.fullmatch(r"[1-9]\d*").all():
                self.ids[field] = None
            else:
                self.ids[field] = {t: i + 1 for i, t in enumerate(pd.unique(tokens))}

    @staticmethod
    def _read(path: Path) -> pd.DataFrame:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
        types = dict(c.split(":", 1) if ":" in c else (c, "token") for c in frame.columns)
        frame.columns = list(types)
        for name, kind in types.items():
            if kind == "float":
                frame[name] = pd.to_numeric(frame[name])
            elif kind.endswith("_seq"):
                frame[name] = frame[name].str.split(" ").apply(
                    lambda v, k=kind: [float(x) for x in v if x] if k == "float_seq" else [x for x in v if x])
        return frame

    def _map(self, field: str, tokens: pd.Series) -> pd.Series:
        mapping = self.ids[field]
        return tokens.astype("int64") if mapping is None else tokens.map(mapping).astype("Int64")

    def events(self) -> Iterator[dict]:
        f = self.inter
        frame = pd.DataFrame({"user": self._map("user_id", f["user_id"]),
                              "item": self._map("item_id", f["item_id"])})
        if "timestamp" in f:
            frame["ts"] = (f["timestamp"].astype(float) * 1000).round().astype("int64")
        else:  # no times: keep each user's file order, like the sequence formats
            frame["ts"] = SEQUENCE_BASE_MS + frame.groupby("user").cumcount() * SEQUENCE_STEP_MS
        if "rating" in f:
            frame["rating"] = f["rating"]
        return self._rating_events(frame)

    def tables(self) -> dict[str, pa.Table]:
        out = {}
        for field, kind in self.ID_FIELDS.items():
            side = self.path.with_suffix(f".{kind}")
            if side.exists():
                frame = self._read(side)
                frame[field] = self._map(field, frame[field])
                out[f"{kind}s"] = pa.Table.from_pandas(frame.dropna(subset=[field]), preserve_index=False)
            if self.ids[field] is not None:
                mapping = self.ids[field]
                out[f"{kind}_ids"] = pa.table({field: list(mapping.values()), "token": list(mapping)})
        return out


class S3Rec(Adapter):
    """`X.txt`: one line per user, `user item item ...`, 1-based, chronological; `X_item2attributes.json`."""

    def events(self) -> Iterator[dict]:
        def sequences():
            with open(self.path) as f:
                for line in f:
                    if line.strip():
                        user, *items = map(int, line.split())
                        yield user, items
        return self._sequence_events(sequences())

    def tables(self) -> dict[str, pa.Table]:
        attrs = self.path.with_name(f"{self.path.stem}_item2attributes.json")
        if not attrs.exists():
            return {}
        data = json.loads(attrs.read_text())
        items = sorted(int(k) for k in data)
        schema = pa.schema([("item_id", pa.int64()), ("attributes", pa.list_(pa.int64()))])
        attributes = [data[str(i)] for i in items]
        return {"items": pa.table({"item_id": items, "attributes": attributes}, schema=schema)}


class Letter(Adapter):
    """`X.inter.json` `{"user": [item, ...]}` (0-based; shifted to 1-based), `X.index.json` semantic
    IDs, and `X.item2id` / `X.user2id` (original id TAB 0-based id) where present."""

    def _side(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".inter.json") + suffix)

    def events(self) -> Iterator[dict]:
        data = json.loads(self.path.read_text())
        ordered = sorted(data.items(), key=lambda kv: int(kv[0]))
        return self._sequence_events((int(u) + 1, [i + 1 for i in items]) for u, items in ordered)

    def tables(self) -> dict[str, pa.Table]:
        out = {}
        index, item2id, user2id = self._side(".index.json"), self._side(".item2id"), self._side(".user2id")
        items = None
        if index.exists():
            sid = json.loads(index.read_text())
            items = pd.DataFrame({"item_id": [int(k) + 1 for k in sid], "semantic_id": list(sid.values())})
        if item2id.exists():
            asin = pd.read_csv(item2id, sep="\t", header=None, names=["asin", "item_id"], dtype={"asin": str})
            asin = asin[["item_id", "asin"]].assign(item_id=asin["item_id"] + 1)
            items = asin if items is None else items.merge(asin, on="item_id", how="outer")
        if items is not None:
            out["items"] = pa.Table.from_pandas(items.sort_values("item_id"), preserve_index=False)
        if user2id.exists():
            users = pd.read_csv(user2id, sep="\t", header=None, names=["source_id", "user_id"],
                                dtype={"source_id": str})
            users["user_id"] += 1
            out["users"] = pa.Table.from_pandas(users[["user_id", "source_id"]], preserve_index=False)
        return out


FORMATS: dict[str, type[Adapter]] = {"movielens-dat": MovieLensDat, "recbole": RecBole, "s3rec": S3Rec,
                                     "letter": Letter}


@dataclass(frozen=True)
class Dataset:
    format: str
    paths: tuple[str, ...]  # relative to datasets.root; the first that exists is used
    prefix: str  # event_id prefix


DATASETS: dict[str, Dataset] = {
    # A full download has ratings.dat; this repository's CI copy holds users 1..2999 only.
    "ml-1m": Dataset("movielens-dat", ("ml-1m/ratings.dat", "ml-1m/ratings_users_1-2999.dat"), "ml1m"),
    "ml-100k": Dataset("recbole", ("ml-100k/ml-100k.inter",), "ml100k"),
    "beauty": Dataset("s3rec", ("amazon/Beauty.txt",), "beauty"),
    "sports": Dataset("s3rec", ("amazon/Sports_and_Outdoors.txt",), "sports"),
    "yelp": Dataset("s3rec", ("yelp/Yelp.txt",), "yelp"),
    "nezha-beauty": Dataset("letter", ("nezha/Beauty/Beauty.inter.json",), "nezhabeauty"),
    "nezha-games": Dataset("letter", ("nezha/Games/Games.inter.json",), "nezhagames"),
}


def open_dataset(name: str, root: str | Path) -> Adapter:
    """The adapter of a named dataset under `root`; FileNotFoundError names the path it looked for."""
    spec = DATASETS[name]
    candidates = [Path(root) / p for p in spec.paths]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"dataset {name!r} not found: looked for {', '.join(map(str, candidates))}")
    return FORMATS[spec.format](path, spec.prefix)


def prefix_for(path: str | Path) -> str:
    """An event_id prefix for an unnamed file: its name without extensions, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", Path(path).name.split(".")[0].lower()) or "data"


def convert(adapter: Adapter, out_dir: str | Path, meta_dir: str | Path,
            events_per_file: int = 200_000) -> dict:
    """Writes the adapter's events into `out_dir` (atomically, in files of `events_per_file`) and its
    attribute tables into `meta_dir`; returns counts."""
    users, items = set(), set()
    with LandingWriter(out_dir, prefix=adapter.prefix, lines_per_file=events_per_file) as writer:
        for event in adapter.events():
            users.add(event["user_id"])
            items.add(event["item_id"])
            writer.write_event(event)
    meta = Path(meta_dir)
    tables = adapter.tables()
    if tables:
        meta.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, meta / f"{name}.parquet")
    return {"source": str(adapter.path), "events": writer.lines_written, "users": len(users),
            "items": len(items), "files": [p.name for p in writer.files],
            "tables": {name: t.num_rows for name, t in tables.items()}, "meta_dir": str(meta)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingestion.datasets", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(DATASETS),
                        help="a named dataset under datasets.root")
    parser.add_argument("--format", choices=sorted(FORMATS),
                        help="with --path: convert any file in this format")
    parser.add_argument("--path", help="the source file (ratings .dat, .inter, X.txt or X.inter.json)")
    parser.add_argument("--out", default=None, help="landing folder (default: ingest.landing_dir)")
    parser.add_argument("--meta-dir", default=None,
                        help="attribute tables (default: datasets.meta_dir/<name>)")
    parser.add_argument("--events-per-file", type=int, default=200_000)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = from_args(args)
    if (args.name is None) == (args.format is None) or (args.format is None) != (args.path is None):
        parser.error("give a dataset name, or --format with --path")
    if args.name:
        try:
            adapter, label = open_dataset(args.name, cfg.datasets.root), args.name
        except FileNotFoundError as err:
            parser.error(str(err))
    else:
        adapter = FORMATS[args.format](Path(args.path), prefix_for(args.path))
        label = adapter.prefix
    meta_dir = args.meta_dir or str(Path(cfg.datasets.meta_dir) / label)
    summary = convert(adapter, args.out or cfg.ingest.landing_dir, meta_dir, args.events_per_file)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
