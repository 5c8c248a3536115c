"""Training samples: labels, history, stats as of the request time, time order, and leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from features.job import FeatureJob
from features.repo import apply_definitions
from features.samples import SampleBuilder
from features.spec import FeatureStoreSpec
from ingestion.contract import ACTION_INDEX
from tests.features.conftest import lake_config
from tests.features.events import Reference, synthetic_events, write_events


def plain(value):
    """Nested numpy arrays (list columns) -> nested lists, so cells compare with ==."""
    return [plain(v) for v in value] if isinstance(value, np.ndarray) else value


def epoch_ms(times: pd.Series) -> pd.Series:
    return times.map(lambda t: t.value // 1_000_000)


def build(cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    FeatureJob(cfg).run(materialize=False)
    report = SampleBuilder(cfg).run()
    ranking = DeltaTable(cfg.lake.table("samples_ranking")).to_pandas().sort_values("sample_no")
    assert len(ranking) == report.requests and ranking["sample_no"].tolist() == list(range(len(ranking)))
    retrieval = DeltaTable(cfg.lake.table("samples_retrieval")).to_pandas()
    return ranking.reset_index(drop=True), retrieval


@pytest.fixture(scope="module")
def samples(feature_lake):
    return build(feature_lake.cfg)


def test_requests_candidates_labels_and_history(samples, feature_lake):
    ranking, _ = samples
    events, spec, ref = feature_lake.events, feature_lake.spec, feature_lake.ref
    assert ranking["request_ts"].is_monotonic_increasing
    by_request: dict[str, list[dict]] = {}
    for e in events:
        if e.get("request_id"):
            by_request.setdefault(e["request_id"], []).append(e)
    assert len(ranking) == len(by_request)
    for row in ranking.itertuples():
        group = by_request[row.request_id]
        imps = [e for e in group if e["action"] == "impression"]
        t = min(e["ts"] for e in imps)
        assert row.request_ts.value // 1_000_000 == t and row.user_id == imps[0]["user_id"]
        assert list(row.cand_item_ids) == [e["item_id"] for e in imps]
        for c, item in enumerate(row.cand_item_ids):
            after = [e for e in group if e["item_id"] == item and t <= e["ts"] < t + 6 * 3600 * 1000]
            assert row.label_click[c] == any(e["action"] == "click" for e in after)
            assert row.label_long_view[c] == any(e["action"] == "view" and e["value"] >= 30 for e in after)
            for task in ("like", "follow", "gift"):
                assert getattr(row, f"label_{task}")[c] == any(e["action"] == task for e in after)
        hist = list(zip(row.hist_item_ids, row.hist_author_ids, row.hist_actions, row.hist_ts))
        assert hist == ref.sequence(row.user_id, t)
        assert len(hist) <= spec.sequence_length and all(ts < t for ts in row.hist_ts)
    assert ranking["label_click"].map(sum).sum() > 10 and ranking["label_gift"].map(sum).sum() > 0


def test_stats_are_feasts_point_in_time_values(samples, feature_lake):
    ranking, _ = samples
    spec = feature_lake.spec
    store = apply_definitions(feature_lake.cfg)
    sample = ranking.iloc[::7]
    rows = [(r.request_ts, item, author, stats, astats) for r in sample.itertuples()
            for item, author, stats, astats in zip(r.cand_item_ids, r.cand_author_ids, r.cand_item_stats,
                                                   r.cand_author_stats)]
    entity_df = pd.DataFrame({"event_timestamp": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                              "author_id": [r[2] for r in rows], "row": range(len(rows))})
    got = store.get_historical_features(entity_df=entity_df, features=["item_stats:stats", "author_stats:stats"],
                                        full_feature_names=True).to_df().set_index("row").sort_index()
    empty = spec.empty_stats().astype(np.float32)
    for i, row in enumerate(rows):
        for col, mine in (("item_stats__stats", row[3]), ("author_stats__stats", row[4])):
            feast = got[col].iloc[i]
            expected = empty if feast is None or (isinstance(feast, float) and np.isnan(feast)) \
                else np.asarray(feast, np.float32)
            assert np.array_equal(np.asarray(mine, np.float32), expected), (i, col)
    assert (ranking["stats_asof_ms"] > 0).mean() > 0.9


def test_no_history_or_feature_value_from_the_sample_time_on(tmp_path, ray_local):
    """Plant events from a cutoff on (some exactly at it): every sample up to the cutoff stays the same,
    and in every sample history and stats are dated before the request time."""
    events = synthetic_events(requests=150, seed=11)
    impressions = sorted((e["ts"], i) for i, e in enumerate(events) if e["action"] == "impression")
    cutoff, at_cutoff = impressions[len(impressions) // 2]
    rng = np.random.default_rng(1)
    # The request at the cutoff: its own user engages its own candidates at exactly the request time.
    planted = [{**e, "event_id": f"c{i}", "action": "like", "request_id": None} for i, e in enumerate(events)
               if e["request_id"] == events[at_cutoff]["request_id"] and e["action"] == "impression"]
    for i in range(300):
        e = dict(events[int(rng.integers(len(events)))])
        ts = cutoff if i % 3 == 0 else cutoff + int(rng.integers(1, 3600_000))
        action = ("click", "like", "gift", "view")[i % 4]
        request_id = None if i % 5 else f"planted{i}"  # some join no impression of theirs: never a label
        planted.append({**e, "event_id": f"p{i}", "ts": ts, "action": action, "request_id": request_id,
                        "value": 60.0 if action == "view" else 5.0 if action == "gift" else None})
    clean, dirty = lake_config(tmp_path / "clean"), lake_config(tmp_path / "dirty")
    write_events(clean.lake.events, events)
    write_events(dirty.lake.events, events + planted)
    before, _ = build(clean)
    after, _ = build(dirty)
    for table in (before, after):
        t_ms = epoch_ms(table["request_ts"])
        assert all(max(h, default=-1) < t for h, t in zip(table["hist_ts"], t_ms))
        assert (table["stats_asof_ms"] <= t_ms).all()
    early = before[epoch_ms(before["request_ts"]) <= cutoff]
    assert len(early) > 20
    same = after.set_index("request_id").loc[early["request_id"]].reset_index()
    for col in early.columns:
        assert early[col].map(plain).tolist() == same[col].map(plain).tolist(), col


def test_ratings_groups_like_and_love(tmp_path, ray_local):
    rng = np.random.default_rng(2)
    start = 1_767_571_200_000
    events = [{"event_id": f"m{i}", "ts": start + int(t), "user_id": 1 + i % 4, "item_id": int(rng.integers(1, 40)),
               "action": "rate", "value": float(rng.integers(1, 6))}
              for i, t in enumerate(np.sort(rng.integers(0, 3 * 86400_000, 400)))]
    for e in events[::2]:  # pairs of ratings a few seconds apart: groups of one user's window
        e["ts"] -= e["ts"] % 60_000
    cfg = lake_config(tmp_path, "features.windows_s=[86400,604800,2592000]", "features.hop_s=3600",
                      "features.sequence_hop_s=86400")
    write_events(cfg.lake.events, events)
    ranking, retrieval = build(cfg)
    assert SampleBuilder(cfg).kind() == "ratings"
    assert {c for c in ranking.columns if c.startswith("label_")} == {"label_like", "label_love"}
    spec = FeatureStoreSpec.from_config(cfg.features)
    ref = Reference(spec, events)
    for row in ranking.itertuples():
        t = row.request_ts.value // 1_000_000
        window = [e for e in events if e["user_id"] == row.user_id and e["ts"] // 60_000 == t // 60_000]
        stars = {e["item_id"]: e["value"] for e in sorted(window, key=lambda e: (e["ts"], e["item_id"]))}
        assert sorted(row.cand_item_ids) == sorted(stars)
        assert [bool(v) for v in row.label_like] == [stars[i] >= 4 for i in row.cand_item_ids]
        assert [bool(v) for v in row.label_love] == [stars[i] == 5 for i in row.cand_item_ids]
        assert list(row.hist_item_ids) == [s[0] for s in ref.sequence(row.user_id, t)]
    for row in retrieval.itertuples():
        mine = sorted((e["ts"], e["item_id"]) for e in events if e["user_id"] == row.user_id)
        assert list(row.item_ids) == [i for _, i in mine] and list(row.ts) == [t for t, _ in mine]
    assert ACTION_INDEX["rate"] in set(np.concatenate(ranking["hist_actions"].to_numpy()).tolist())


def test_long_rating_sessions_are_split_not_truncated(tmp_path, ray_local):
    start = 1_767_571_200_000
    session = [{"event_id": f"s{i}", "ts": start + 1000 * i, "user_id": 3, "item_id": 10 + i, "action": "rate",
                "value": float(1 + i % 5)} for i in range(7)]
    cfg = lake_config(tmp_path, "features.windows_s=[86400]", "features.hop_s=3600", "features.sequence_hop_s=86400",
                      "samples.max_candidates=3")
    write_events(cfg.lake.events, session)
    ranking, _ = build(cfg)
    assert [len(c) for c in ranking["cand_item_ids"]] == [3, 3, 1]
    assert sorted(i for c in ranking["cand_item_ids"] for i in c) == [e["item_id"] for e in session]
    assert ranking["request_ts"].nunique() == 1 and ranking["request_id"].nunique() == 3
    assert [list(v) for v in ranking["label_love"]] == [[0, 0, 0], [0, 1, 0], [0]]


def test_the_ranking_contract_is_in_the_commit_that_wrote_the_rows(samples, feature_lake):
    from features.sample_contract import RankingContract

    ranking, _ = samples
    cfg, events = feature_lake.cfg, feature_lake.events
    commit = next(h for h in DeltaTable(cfg.lake.table("samples_ranking")).history() if h["operation"] == "WRITE")
    contract = RankingContract.from_metadata(commit, "samples_ranking")
    assert contract.tasks == ("click", "long_view", "like", "follow", "gift") and contract.kind == "livestream"
    assert set(contract.columns) <= set(ranking.columns)
    # vocabulary sizes: the largest ids of the events the rows were built from
    assert contract.num_users == max(e["user_id"] for e in events)
    assert contract.num_items == max(e["item_id"] for e in events)
    assert contract.num_authors == max(e.get("author_id") or 0 for e in events)
