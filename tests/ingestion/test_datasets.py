"""Dataset adapters against the real files in ../shared/datasets (skipped, naming the path, if absent)
and against tiny files in each format (always run)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from config import load
from ingestion.contract import EventTimeBounds, check_event
from ingestion.datasets import DATASETS, SEQUENCE_BASE_MS, Letter, RecBole, S3Rec, convert, main, open_dataset

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / load(None).datasets.root
# MovieLens-100K is from 1997-98, before the ingestion default's minimum event time.
ANY_TIME = EventTimeBounds(min_ts_ms=0)
NOW_MS = 1_800_000_000_000


def adapter(name: str):
    for rel in DATASETS[name].paths:
        if (ROOT / rel).exists():
            return open_dataset(name, ROOT)
    pytest.skip(f"dataset not found: {ROOT / DATASETS[name].paths[-1]}")


def counts(events) -> tuple[int, int, int]:
    users, items, n = set(), set(), 0
    for e in events:
        users.add(e["user_id"])
        items.add(e["item_id"])
        n += 1
    return n, len(users), len(items)


def read_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_ml_100k_converts_completely(tmp_path):
    summary = convert(adapter("ml-100k"), tmp_path / "landing", tmp_path / "meta", events_per_file=60_000)
    assert (summary["events"], summary["users"], summary["items"]) == (100_000, 943, 1_682)
    assert summary["files"] == ["ml100k-000001.jsonl", "ml100k-000002.jsonl"]
    events = read_lines(tmp_path / "landing")
    assert {check_event(e, ANY_TIME, NOW_MS) for e in events} == {None}
    assert len({e["event_id"] for e in events}) == 100_000
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert {e["action"] for e in events} == {"rate"}
    assert {e["value"] for e in events} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert "author_id" not in events[0]
    users = pd.read_parquet(tmp_path / "meta" / "users.parquet")
    items = pd.read_parquet(tmp_path / "meta" / "items.parquet")
    assert (len(users), len(items)) == (943, 1_682)
    assert {"user_id", "age", "gender", "occupation", "zip_code"} <= set(users.columns)
    assert list(items.loc[items["item_id"] == 1, "class"].iloc[0]) == ["Animation", "Children's", "Comedy"]


def test_ml_1m_subset_counts_and_latin1_metadata():
    ml = adapter("ml-1m")
    events = ml.events()
    first = next(events)
    assert first["event_id"] == f"ml1m-{first['user_id']}-{first['item_id']}-{first['ts'] // 1000}"
    assert check_event(first, EventTimeBounds(), NOW_MS) is None and first["action"] == "rate"
    n, users, items = counts(events)
    assert (n + 1, users, items) == (487_650, 2_999, 3_615)  # ids of the first event are seen again
    tables = ml.tables()
    titles = tables["items"].column("title").to_pylist()
    assert "Misérables, Les (1995)" in titles  # latin-1 decoded
    assert tables["items"].num_rows == 3_883 and tables["users"].num_rows == 6_040


@pytest.mark.parametrize("name,expected", [
    ("beauty", (198_502, 22_363, 12_101)),
    ("sports", (296_337, 35_598, 18_357)),
    ("yelp", (316_354, 30_431, 20_033)),
    ("nezha-games", (452_989, 50_546, 16_859)),
])
def test_sequence_datasets_match_the_readme(name, expected):
    assert counts(adapter(name).events()) == expected


def test_letter_ids_are_shifted_to_equal_s3rec_ids():
    """nezha/Beauty is amazon/Beauty.txt with ids minus 1 (README): after the shift they coincide."""
    def triples(a):
        return {(e["user_id"], e["item_id"], e["ts"]) for e in a.events()}
    nezha, amazon = triples(adapter("nezha-beauty")), triples(adapter("beauty"))
    assert len(nezha) == 198_502 and nezha == amazon
    items = adapter("nezha-beauty").tables()["items"]
    assert items.num_rows == 12_101 and items.column("item_id").to_pylist()[0] == 1


# -- tiny files in each format: what a new dataset in the same format gets -------------------------
def test_s3rec_file_keeps_order_with_ordinal_times(tmp_path):
    path = tmp_path / "Tiny.txt"
    path.write_text("1 5 6 5\n2 7\n")
    (tmp_path / "Tiny_item2attributes.json").write_text('{"5": [1, 2], "6": [3], "7": []}')
    events = list(S3Rec(path, "tiny").events())
    assert [(e["user_id"], e["item_id"]) for e in events] == [(1, 5), (1, 6), (1, 5), (2, 7)]
    assert [e["ts"] - SEQUENCE_BASE_MS for e in events] == [0, 1000, 2000, 0]
    assert [e["event_id"] for e in events] == ["tiny-1-0", "tiny-1-1", "tiny-1-2", "tiny-2-0"]
    assert {e["action"] for e in events} == {"click"} and all("value" not in e for e in events)
    assert S3Rec(path, "tiny").tables()["items"].to_pylist()[0] == {"item_id": 5, "attributes": [1, 2]}


def test_letter_file_shifts_users_and_items(tmp_path):
    path = tmp_path / "Toy.inter.json"
    path.write_text('{"1": [3, 0], "0": [0]}')
    (tmp_path / "Toy.item2id").write_text("B0001\t0\nB0003\t3\n")
    events = list(Letter(path, "toy").events())
    assert [(e["user_id"], e["item_id"]) for e in events] == [(1, 1), (2, 4), (2, 1)]
    assert Letter(path, "toy").tables()["items"].to_pylist() == [{"item_id": 1, "asin": "B0001"},
                                                                 {"item_id": 4, "asin": "B0003"}]


def test_recbole_tokens_are_numbered_and_typed(tmp_path):
    path = tmp_path / "shop.inter"
    path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                    "alice\tB01\t4\t1600000001\nbob\tB02\t5\t1600000000\nalice\tB02\t3.5\t1600000002\n")
    (tmp_path / "shop.item").write_text("item_id:token\ttags:token_seq\tprice:float\nB02\tx y\t9.5\n")
    shop = RecBole(path, "shop")
    events = list(shop.events())
    rows = [(e["user_id"], e["item_id"], e["value"]) for e in events]
    assert rows == [(2, 2, 5.0), (1, 1, 4.0), (1, 2, 3.5)]  # in time order; ids by first appearance
    assert events[0]["ts"] == 1_600_000_000_000 and events[0]["event_id"] == "shop-2-2-1600000000"
    tables = shop.tables()
    assert tables["items"].to_pylist() == [{"item_id": 2, "tags": ["x", "y"], "price": 9.5}]
    assert tables["user_ids"].to_pylist() == [{"user_id": 1, "token": "alice"},
                                              {"user_id": 2, "token": "bob"}]


def test_cli_generic_format_and_errors(tmp_path, capsys):
    dat = tmp_path / "ratings.dat"
    dat.write_text("2::10::5::978300760\n1::10::3::978300000\n")
    assert main(["--format", "movielens-dat", "--path", str(dat), "--out", str(tmp_path / "landing"),
                 "--meta-dir", str(tmp_path / "meta")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["events"], summary["files"]) == (2, ["ratings-000001.jsonl"])
    assert [e["user_id"] for e in read_lines(tmp_path / "landing")] == [1, 2]  # time order
    with pytest.raises(SystemExit):
        main(["ml-1m", "--set", f"datasets.root={tmp_path / 'nowhere'}", "--out", str(tmp_path)])
    assert "dataset 'ml-1m' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "s3rec", "--out", str(tmp_path)])  # --format needs --path
