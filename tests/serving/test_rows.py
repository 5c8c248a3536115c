"""The request path's pieces without Serve: rows built for several requests at once equal the per-request rows
training's conversion sees, the candidate cache answers what the store holds, and the settings board hands a
stage's user_config to its followers."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from features.online import OnlineFeatureClient
from serving.common import SettingsBoard
from serving.lookup import CandidateCache, Candidates, UserFeatures, batch_rows, default_features, ranking_rows
from tests.features.conftest import materialized_store, online_config

NOW_MS = 1_767_571_200_000


def test_batch_rows_equal_the_per_request_rows(feature_lake, tmp_path):  # feature_lake: from tests/serving/conftest.py
    cfg = online_config(feature_lake.cfg, tmp_path / "feast", "sqlite")
    materialized_store(cfg, feature_lake.report)
    client = OnlineFeatureClient(cfg)
    cache = CandidateCache(client, ttl_s=60.0)
    rng = np.random.default_rng(0)
    requests = [(user, rng.integers(1, 40, size=n)) for user, n in ((1, 12), (4, 1), (424242, 7), (7, 30))]
    per_request = [client.get(user, items) for user, items in requests]
    users = [UserFeatures.of(f) for f in per_request]
    assert [u.unknown for u in users] == [False, False, True, False]
    for cached in (False, True):  # the first call reads the store, the second answers from the cache
        cands = [cache.get(items) for _, items in requests]
        got = batch_rows(users, cands, [NOW_MS + i for i in range(len(requests))])
        expected = [ranking_rows(f, NOW_MS + i) for i, f in enumerate(per_request)]
        for i, row in enumerate(expected):
            assert got.slice(i, 1).equals(row), (cached, i)
    empty = default_features(client.stat_names, 9, [])
    assert batch_rows([UserFeatures.of(empty)], [Candidates.of(empty)], [NOW_MS]).equals(ranking_rows(empty, NOW_MS))


def test_candidate_cache_rereads_after_its_ttl(feature_lake, tmp_path):  # feature_lake: from tests/serving/conftest.py
    cfg = online_config(feature_lake.cfg, tmp_path / "feast", "sqlite")
    materialized_store(cfg, feature_lake.report)
    cache = CandidateCache(OnlineFeatureClient(cfg), ttl_s=0.2)
    first = cache.get([3, 1, 3])
    read_at = cache._table[1].copy()
    assert np.array_equal(first.item_ids, [3, 1, 3]) and np.array_equal(first.item_stats[0], first.item_stats[2])
    cache.get([1])
    assert np.array_equal(cache._table[1], read_at), "within the TTL nothing is read again"
    time.sleep(0.25)
    cache.get([1])
    assert cache._table[1][0] > read_at[0] and cache._table[1][1] == read_at[1]  # item 1 re-read, item 3 kept


def test_settings_board_hands_new_settings_to_its_followers_and_names_who_is_behind():
    async def scenario():
        board = SettingsBoard()
        board.publish({"artifact": "a"})
        applied: dict[str, list] = {"x": [], "y": []}

        async def follower(name: str, stop: asyncio.Event) -> None:
            token = ""
            while not stop.is_set():
                got, uc = await board.follow(name, token, wait_s=0.05)
                if got != token:
                    await asyncio.sleep(0.1)  # loading the model
                    applied[name].append(uc["artifact"])
                    token = got

        stop = asyncio.Event()
        tasks = [asyncio.create_task(follower(n, stop)) for n in applied]
        await asyncio.sleep(0.3)
        assert applied == {"x": ["a"], "y": ["a"]} and board.behind() == []
        board.publish({"artifact": "b"})
        assert sorted(board.behind()) == ["x", "y"]
        await asyncio.sleep(0.3)
        assert applied == {"x": ["a", "b"], "y": ["a", "b"]} and board.behind() == []
        board.publish({"artifact": "b"})  # the same settings (another replica's board): nothing to apply
        await asyncio.sleep(0.2)
        assert applied == {"x": ["a", "b"], "y": ["a", "b"]} and board.behind() == []
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_bad_cascade_setting_names_itself():
    from serving.cascade import Cascade

    for bad in ({"batch_size": "many"}, {"batch_size": 0}, {"item_cache_ttl_s": [1]}):
        with pytest.raises(ValueError, match=r"batch_size|item_cache_ttl_s"):
            asyncio.run(Cascade({}, ("n",)).configure("ranker", bad, None, {}))
