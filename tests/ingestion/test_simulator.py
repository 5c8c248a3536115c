"""The live-stream simulator and the landing writer: contract, determinism, statistics, signal."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from config import load
from ingestion.contract import EventTimeBounds, check_event
from ingestion.landing import LandingWriter
from ingestion.simulator import auc, main, oracle_auc, read_oracle, simulate
from ingestion.simulator_world import CLICK_BIAS, LOGIT_TERMS

# A small, dense world: enough traffic per item for momentum to be measurable in ~1 s of simulation.
SMALL = ["simulator.events=40000", "simulator.users=800", "simulator.streamers=100",
         "simulator.sessions_per_user_day=40", "simulator.events_per_file=15000"]


def run(tmp: Path, *overrides: str) -> tuple[dict, Path]:
    cfg = load(None, [*SMALL, f"simulator.oracle_dir={tmp / 'oracle'}", *overrides]).simulator
    return simulate(cfg, tmp / "landing", fsync=False), tmp


def lines_of(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            out += f.read().splitlines()
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[dict, Path]:
    return run(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def events(clean) -> pd.DataFrame:
    return pd.DataFrame([json.loads(line) for line in lines_of(clean[1] / "landing")])


def test_same_seed_gives_byte_identical_files(clean, tmp_path):
    _, again = run(tmp_path)
    for sub in ("landing", "oracle"):
        names = sorted(p.name for p in (clean[1] / sub).iterdir())
        assert names == sorted(p.name for p in (again / sub).iterdir())
        for name in names:
            assert (clean[1] / sub / name).read_bytes() == (again / sub / name).read_bytes(), name


def test_every_event_follows_the_contract(clean, events):
    summary, root = clean
    lines = lines_of(root / "landing")
    assert len(lines) == summary["valid_events"] == 40000 == summary["lines"]
    now_ms = int(events["ts"].max()) + 1
    reasons = {check_event(json.loads(line), EventTimeBounds(), now_ms) for line in lines}
    assert reasons == {None}
    assert events["event_id"].is_unique
    assert events["ts"].is_monotonic_increasing  # views are held back until the watching ends
    assert events["author_id"].notna().all() and events["request_id"].notna().all()
    has_value = events["value"].notna()
    assert set(events.loc[has_value, "action"]) == {"view", "gift"}
    assert (events["action"] == "view").sum() == has_value[events["action"] == "view"].sum()
    assert len(summary["files"]) == 3  # 15,000 lines per file


def test_click_rates_and_popularity_skew(clean, events):
    actions = events["action"].value_counts()
    ctr = actions["click"] / actions["impression"]
    assert 0.02 <= ctr <= 0.15
    assert clean[0]["ctr"] == pytest.approx(ctr)
    per_click = actions.reindex(["like", "comment", "share", "follow", "gift"]) / actions["click"]
    assert (per_click > 0.001).all() and (per_click < 0.3).all(), per_click.to_dict()
    shown = events.loc[events["action"] == "impression", "item_id"].value_counts()
    n_items = len(pd.read_parquet(clean[1] / "oracle" / "items.parquet"))
    top = shown.iloc[: max(1, n_items // 100)].sum() / shown.sum()
    assert top >= 0.10, f"top 1% of items get {top:.1%} of impressions"
    # Every request shows K distinct items.
    per_request = events[events["action"] == "impression"].groupby("request_id")["item_id"]
    assert (per_request.nunique() == per_request.size()).all()


def test_oracle_is_complete_calibrated_and_informative(clean, events):
    oracle = read_oracle(clean[1] / "oracle")
    impressions = events[events["action"] == "impression"]
    assert set(oracle["event_id"]) == set(impressions["event_id"])
    assert oracle["p_click"].mean() == pytest.approx(oracle["clicked"].mean(), rel=0.15)
    best = oracle_auc(clean[1] / "oracle")
    assert best > 0.7
    # Labels from the log agree, but for clicks drawn in the last seconds, after the log's end.
    assert oracle_auc(clean[1] / "oracle", events) == pytest.approx(best, abs=1e-3)
    later = oracle_auc(clean[1] / "oracle", since_ts_ms=int(oracle["ts"].quantile(0.9)))
    assert later > 0.65
    # The hidden hype term: live rooms' sd 0.9, videos' 0.5 (simulator_world); removing it costs the ceiling AUC.
    hype = oracle["hype_logit"].to_numpy()
    assert np.isfinite(hype).all() and 0.3 < hype.std() < 1.0
    blind = 1 / (1 + np.exp(-(np.log(oracle["p_click"] / (1 - oracle["p_click"])) - hype)))
    assert auc(oracle["clicked"].to_numpy(), blind.to_numpy()) < best
    # Every term of the click logit is written, and with the bias they make up the logit exactly.
    terms = oracle[[f"{term}_logit" for term in LOGIT_TERMS]].to_numpy()
    logit = np.log(oracle["p_click"] / (1 - oracle["p_click"])).to_numpy()
    np.testing.assert_allclose(CLICK_BIAS + terms.sum(1), logit, atol=1e-4)
    assert (terms.std(0) > 0).all(), "a term that never varies says nothing"


def _split(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Impressions, clicks, and per impression whether it was clicked (same request and item)."""
    imp = events[events["action"] == "impression"]
    clicks = events[events["action"] == "click"]
    pair = ["request_id", "item_id"]
    return imp, clicks, imp.set_index(pair).index.isin(clicks.set_index(pair).index)


def _key(ids: pd.Series, ts: pd.Series) -> np.ndarray:
    """(id, ts) packed in one sortable integer (ts relative to the simulation start fits 42 bits)."""
    return ids.to_numpy() * 2**42 + ts.to_numpy() - 1_700_000_000_000


def test_recent_clicks_on_an_item_predict_its_next_clicks(events):
    """Momentum: relative to the item's own average CTR, impressions shown while the item's clicks
    in the last 5 minutes run above its last-hour rate are clicked more, and below it less (so
    real-time windowed stats carry signal beyond item identity)."""
    imp, clicks, clicked = _split(events)
    keys, key = np.sort(_key(clicks["item_id"], clicks["ts"])), _key(imp["item_id"], imp["ts"])
    last_5m = np.searchsorted(keys, key) - np.searchsorted(keys, key - 5 * 60_000)
    last_1h = np.searchsorted(keys, key) - np.searchsorted(keys, key - 60 * 60_000)
    trend = (last_5m + 0.5) / (last_1h / 12 + 0.5)
    item_ctr = pd.Series(clicked).groupby(imp["item_id"].to_numpy()).transform("mean").to_numpy()
    hot, cold = trend > 1.5, trend < 0.7
    hot_lift = clicked[hot].sum() / item_ctr[hot].sum()
    cold_lift = clicked[cold].sum() / item_ctr[cold].sum()
    assert hot_lift > 1.1 and cold_lift < 0.9, (hot_lift, cold_lift)


def test_recent_history_predicts_clicks(clean, events):
    """Sequence signal: an impression whose topic is that of the user's last click is clicked more."""
    topic = pd.read_parquet(clean[1] / "oracle" / "items.parquet").set_index("item_id")["topic"]
    imp, clicks, clicked = _split(events)
    clicks = clicks.sort_values(["user_id", "ts"])
    last = np.searchsorted(_key(clicks["user_id"], clicks["ts"]), _key(imp["user_id"], imp["ts"])) - 1
    last_user = clicks["user_id"].to_numpy()[np.maximum(last, 0)]
    has_last = (last >= 0) & (last_user == imp["user_id"].to_numpy())
    last_topic = topic.loc[clicks["item_id"].to_numpy()[np.maximum(last, 0)]].to_numpy()
    same = has_last & (last_topic == topic.loc[imp["item_id"]].to_numpy())
    lift = clicked[same].mean() / clicked[has_last & ~same].mean()
    assert lift > 1.5, f"same-topic-as-last-click CTR lift {lift:.2f}"


def test_malformed_lines_are_extra_and_counted(clean, tmp_path):
    summary, root = run(tmp_path, "simulator.malformed_rate=0.05")
    assert summary["valid_events"] == 40000
    assert summary["lines"] == 40000 + summary["malformed_lines"] + summary["duplicate_lines"]
    assert set(summary["malformed_by_kind"]) == {"broken_json", "truncated", "missing_field", "wrong_type",
                                                 "negative_id", "unknown_action", "nan_value", "future_ts",
                                                 "duplicate"}
    clean_lines = lines_of(clean[1] / "landing")
    kept, bad, dups = [], 0, 0
    for line in lines_of(root / "landing"):
        try:
            reason = check_event(json.loads(line), EventTimeBounds(), 2 * 10**12)
        except json.JSONDecodeError:
            reason = "malformed JSON"
        if reason is not None:
            bad += 1
        elif kept and line in (kept[-1],):
            dups += 1  # a re-sent copy follows its original
        else:
            kept.append(line)
    assert kept == clean_lines  # injected lines replace nothing and change nothing valid
    assert (bad, dups) == (summary["malformed_lines"], summary["duplicate_lines"])


def test_gzip_and_cli(tmp_path, capsys):
    oracle = tmp_path / "oracle"
    assert main(["--set", "simulator.events=3000", "--set", "simulator.gzip=true", "--set",
                 f"simulator.oracle_dir={oracle}", "--out", str(tmp_path / "landing"), "--no-fsync"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["valid_events"] == 3000 and printed["files"] == 1
    (path,) = (tmp_path / "landing").iterdir()
    assert path.name == "sim7-000001.jsonl.gz"
    assert len(gzip.decompress(path.read_bytes()).splitlines()) == 3000
    assert json.loads((oracle / "summary.json").read_text())["valid_events"] == 3000


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + labels * 0.3, 1)  # rounding makes ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(labels, scores) == pytest.approx(pairwise)
    assert np.isnan(auc(np.zeros(3, bool), np.arange(3)))


# -- landing writer ---------------------------------------------------------------------------
EVENT = {"event_id": "e", "ts": 1767571200000, "user_id": 1, "item_id": 2, "action": "click"}


def test_writer_rotates_hides_temporaries_and_never_reuses_names(tmp_path):
    with LandingWriter(tmp_path, prefix="x", lines_per_file=3) as w:
        w.write_events(dict(EVENT, event_id=str(i)) for i in range(4))
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["x-000001.jsonl"]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".x-000002.jsonl.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000001.jsonl", "x-000002.jsonl"]
    assert (tmp_path / "x-000002.jsonl").read_text() == json.dumps(dict(EVENT, event_id="3"),
                                                                    separators=(",", ":")) + "\n"
    for _ in range(2):
        with LandingWriter(tmp_path, prefix="x", lines_per_file=3, gzip_files=True) as w:
            w.write_line("raw line, not JSON")
    assert w.files == [tmp_path / "x-000004.jsonl.gz"]
    assert gzip.decompress(w.files[0].read_bytes()) == b"raw line, not JSON\n"
    # No time stamp and no temporary name in the gzip header: same lines, same bytes.
    assert (tmp_path / "x-000003.jsonl.gz").read_bytes() == w.files[0].read_bytes()


def test_writer_blocks_split_at_line_ends(tmp_path):
    data = b"a\nbb\nccc\ndddd\n"
    w = LandingWriter(tmp_path, prefix="b", lines_per_file=3, fsync=False)
    w.write_block(data, np.array([2, 5, 9, 14]))
    w.write_block(b"e\n", np.array([2]))
    files = w.close()
    assert [f.read_bytes() for f in files] == [b"a\nbb\nccc\n", b"dddd\ne\n"]
    assert w.lines_written == 5


def test_writer_drops_the_unfinished_file_on_error(tmp_path):
    with pytest.raises(RuntimeError), LandingWriter(tmp_path, prefix="z", lines_per_file=2) as w:
        w.write_events([EVENT, EVENT, EVENT])
        raise RuntimeError("crash mid-file")
    assert [p.name for p in tmp_path.iterdir()] == ["z-000001.jsonl"]  # whole files only
    with pytest.raises(ValueError):
        LandingWriter(tmp_path, prefix=".hidden")
