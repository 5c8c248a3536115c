"""The serving client and the real-time updater, against SQLite and a real redis-server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from features.job import FeatureJob
from features.merged_reads import run_steps
from features.online import MAX_CANDIDATES, FeatureStoreUnavailable, OnlineFeatureClient, OnlineFeatures
from features.realtime import start_from_lake
from features.spec import STATS_ENTITIES
from tests.features.conftest import materialized_store, online_config
from tests.redis_server import free_port


@pytest.fixture(params=["sqlite", "redis"])
def online(request, feature_lake, tmp_path):
    """The shared lake, materialised into a fresh online store of each kind."""
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    if redis is not None:
        import redis as redis_client

        redis_client.Redis(port=redis.port).flushall()
    cfg = online_config(feature_lake.cfg, tmp_path / "feast", request.param, redis)
    return cfg, materialized_store(cfg, feature_lake.report)


def assert_same(a: OnlineFeatures, b: OnlineFeatures) -> None:
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), name
        else:
            assert np.array_equal(np.asarray(x), np.asarray(y)), name


def test_fast_path_returns_exactly_what_feast_returns(online, feature_lake):
    cfg, store = online
    fast, feast = OnlineFeatureClient(cfg, store=store), OnlineFeatureClient(cfg, fast=False, store=store)
    items = [*range(1, 31), 999, 3, 1000]  # unknown ids and a repeat among them
    for user in (1, 2, 7, 999):
        assert_same(fast.get(user, items), feast.get(user, items))
    got = fast.get(2, items)
    state = FeatureJob(cfg).last_state()
    t_hi = state.stats_k_hi * feature_lake.spec.hop_ms
    for i, item in enumerate(items[:30]):
        assert np.array_equal(got.item_stats[i], feature_lake.ref.stats("item", item, t_hi))
        assert got.author_stats[i].shape == got.item_stats[i].shape


def test_a_read_of_more_keys_than_a_candidate_list_matches_feast(online):
    """The real-time updater reads many users' sequences at once: past the SQLite reader's first 512 positions
    (it grows them) the answer is still Feast's."""
    cfg, store = online
    fast, feast = OnlineFeatureClient(cfg, store=store), OnlineFeatureClient(cfg, fast=False, store=store)
    users = [*range(1200, 0, -1), 7, 5000]
    got = fast.sequences(users)
    assert got.keys() == feast.sequences(users).keys() and {1, 2, 7} <= got.keys()
    for user, (sequence, asof) in feast.sequences(users).items():
        assert got[user][1] == asof and all(np.array_equal(got[user][0][f], sequence[f]) for f in sequence)


def test_concurrent_readers_of_one_client_get_what_a_lone_reader_gets(online):
    """Serving's thread pool shares one client: 8 threads reading at once (SQLite: a connection each) get the
    same answers as the reads made one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, store = online
    client = OnlineFeatureClient(cfg, store=store)
    asks = [(user, [*range(user, user + 40), 999]) for user in (1, 2, 3, 5, 7, 11, 999) * 4]
    alone = [client.get(user, items) for user, items in asks]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ask: client.get(*ask), asks))
    for a, b in zip(alone, together):
        assert_same(a, b)


def test_one_read_of_many_requests_answers_each_as_a_read_of_its_own(online):
    """Concurrent requests are merged into one store read (`features.merged_reads`); requests that share a user or
    candidates, repeat a candidate or name unknown ones each get what a read of their own gets."""
    cfg, store = online
    client = OnlineFeatureClient(cfg, store=store)
    asks = [(1, np.array([3, 1, 2, 3], np.int64)), (2, np.array([2, 999, 40], np.int64)),
            (1, np.array([40], np.int64)), (999, np.array([], np.int64)), (7, np.arange(1, 60))]
    merged = run_steps(client._get_many(asks))
    for (user, items), got in zip(asks, merged):
        assert_same(got, client.get(user, items))


def test_redis_reads_in_flight_at_once_each_get_their_own_answers(feature_lake, tmp_path, redis_server):
    """A reader thread keeps `reads_in_flight` Redis reads on the wire at once (`features.merged_reads`): each on
    its own connection, so reads stepped in any order, one sent while another's replies wait, get what a read made
    alone gets."""
    import redis as redis_client

    redis_client.Redis(port=redis_server.port).flushall()
    cfg = online_config(feature_lake.cfg, tmp_path / "feast", "redis", redis_server)
    store = materialized_store(cfg, feature_lake.report)
    client = OnlineFeatureClient(cfg, store=store)
    assert client._merged.depth == cfg.features.online_store.reads_in_flight == 2
    asks = [[(1, np.arange(1, 40))], [(2, np.array([5, 999, 3], np.int64)), (7, np.arange(20, 60))]]
    first, second = (client._get_many(a) for a in asks)
    next(first)  # sent
    next(second)  # sent while the first's replies wait
    next(second)  # the second's candidates received, its authors sent
    next(first)
    answers = {}
    for name, steps in (("second", second), ("first", first)):
        with pytest.raises(StopIteration) as done:
            next(steps)
        answers[name] = done.value.value
    for ask, got in zip(asks[0] + asks[1], answers["first"] + answers["second"]):
        assert_same(got, client.get(*ask))


@pytest.mark.parametrize("threads", [2, 3])
def test_a_sqlite_read_split_over_connections_answers_as_one_query(feature_lake, tmp_path, threads):
    """With `threads_per_read`, a read of 256 keys or more runs in slices on several connections at once; each
    request, merged or alone, gets what the one-query read gets (unknown and repeated ids among the keys)."""
    cfg = online_config(feature_lake.cfg, tmp_path / "feast", "sqlite")
    store = materialized_store(cfg, feature_lake.report)
    split = cfg.model_copy(deep=True)
    split.features.online_store.threads_per_read = threads
    one, sliced = OnlineFeatureClient(cfg, store=store), OnlineFeatureClient(split, store=store)
    assert sliced._reader.threads_per_read == threads
    asks = [(1, np.arange(1, 301)), (2, np.array([3, 999, 3, 40], np.int64)), (999, np.arange(250, 0, -1)),
            (7, np.array([], np.int64))]
    for a, b in zip(run_steps(one._get_many(asks)), run_steps(sliced._get_many(asks))):
        assert_same(a, b)
    assert_same(one.get(1, list(range(1, 400))), sliced.get(1, list(range(1, 400))))
    users = [*range(600, 0, -1), 7, 5000]
    expected, got = one.sequences(users), sliced.sequences(users)
    assert expected.keys() == got.keys() and {1, 2, 7} <= got.keys()
    for user, (sequence, asof) in expected.items():
        assert got[user][1] == asof and all(np.array_equal(got[user][0][f], sequence[f]) for f in sequence)


def test_unknown_entities_get_defaults_flagged_missing(online):
    cfg, store = online
    got = OnlineFeatureClient(cfg, store=store).get(123456, [1, 654321])
    assert got.user_missing and got.sequence_missing and got.sequence["item_ids"].size == 0
    assert got.item_missing.tolist() == [False, True] and got.author_missing.tolist() == [False, True]
    assert np.array_equal(got.item_stats[1], got.user_stats) and got.item_author_ids[1] == 0
    with pytest.raises(ValueError, match="at most"):
        OnlineFeatureClient(cfg, store=store).get(1, list(range(MAX_CANDIDATES + 1)))


def test_unreachable_store_raises_one_exception_type(feature_lake, tmp_path):
    missing = online_config(feature_lake.cfg, tmp_path / "nothing-here", "sqlite")
    with pytest.raises(FeatureStoreUnavailable):
        OnlineFeatureClient(missing).get(1, [1])

    class Closed:  # nothing listens on this port
        connection_string = f"127.0.0.1:{free_port()},db=0"

    down = online_config(feature_lake.cfg, tmp_path / "down", "redis", Closed())
    with pytest.raises(FeatureStoreUnavailable):
        OnlineFeatureClient(down).get(1, [1])


def test_realtime_updates_equal_the_batch_definition(online, feature_lake):
    """Live events after the lake's end: sequences append, counters add up and expire exactly."""
    cfg, store = online
    spec, ref = feature_lake.spec, feature_lake.ref
    updater = start_from_lake(cfg, store)
    client = OnlineFeatureClient(cfg, store=store)
    end = int(ref.ts.max())
    live = [{"event_id": f"live{i}", "ts": end + 1000 * (i + 1), "user_id": 1 + i % 3, "item_id": 1 + i % 5,
             "author_id": int(ref.keys["author_id"][ref.keys["item_id"] == 1 + i % 5][0]),
             "request_id": None, "action": ("click", "like", "impression")[i % 3], "value": None} for i in range(12)]
    started = time.perf_counter()
    updater.update(live)
    assert time.perf_counter() - started < 5
    everything = type(ref)(spec, feature_lake.events + live)
    now = max(e["ts"] for e in live)
    boundary = (now // spec.hop_ms + 1) * spec.hop_ms
    got = client.get(1, list(range(1, 31)))
    for i, item in enumerate(range(1, 31)):
        assert np.array_equal(got.item_stats[i], everything.stats("item", item, boundary, until_ms=now)), item
    assert list(zip(got.sequence["item_ids"], got.sequence["actions"])) == \
        [(s[0], s[2]) for s in everything.sequence(1, now + 1)]
    assert got.sequence_asof_ms == now + 1

    # An hour later one event arrives: every entity's 5-minute and 1-hour windows have emptied, online too.
    later = now + 3600 * 1000
    updater.update([{"event_id": "late", "ts": later, "user_id": 3, "item_id": 29, "author_id": 1,
                     "action": "impression"}])
    boundary = (later // spec.hop_ms + 1) * spec.hop_ms
    got = client.get(2, list(range(1, 31)))
    for entity, stats in (("item", got.item_stats[0]), ("user", got.user_stats)):
        expected = everything.stats(entity, 1 if entity == "item" else 2, boundary, until_ms=later)
        assert np.array_equal(stats, expected), entity
    five_min = [i for i, n in enumerate(spec.stat_names) if n.endswith("_count_5m")]
    assert got.item_stats[:28, five_min].sum() == 0 and got.item_stats[:, -14:].sum() > 0
    assert set(updater.buckets) == set(STATS_ENTITIES)


def test_ingest_follow_pushes_each_batch_online(tmp_path, ray_local):
    """`python -m ray_jobs.ingest --follow --push-features`: each committed batch reaches the online store."""
    from features.job import FeatureJob
    from ingestion.job import IngestJob
    from ray_jobs.ingest import _feature_pusher
    from tests.ingestion.lake_checks import good_event, make_config, write_lines

    cfg = make_config(tmp_path, "ingest.build_data_docs=false", "ingest.poll_interval_s=0.1",
                      f"features.feast_dir={tmp_path / 'feast'}",
                      f"features.online_store.path={tmp_path / 'online.db'}")
    write_lines(tmp_path / "landing", "a.jsonl", [good_event(i) for i in range(300)])
    IngestJob(cfg).run_once()
    FeatureJob(cfg).run()
    push = _feature_pusher(cfg)
    newest = good_event(299)["ts"]
    live = [{**good_event(i, "live"), "ts": newest + 1000 * (i + 1), "user_id": 99, "item_id": 7, "action": "click"}
            for i in range(3)]
    write_lines(tmp_path / "landing", "b.jsonl", live)
    report = IngestJob(cfg).follow(max_seconds=1.0, on_batch=push)
    assert [b.valid for b in report.batches] == [3]
    # the pusher reads the batch's rows back from the lake (the job's driver never holds them)
    from features.realtime import events_of_batch

    pushed = events_of_batch(cfg, report.batches[0].batch_no)
    assert pushed["user_id"].to_pylist() == [99] * 3 and pushed["ts"].to_pylist() == sorted(pushed["ts"].to_pylist())
    got = OnlineFeatureClient(cfg).get(99, [7])
    assert got.sequence["item_ids"].tolist() == [7, 7, 7]
    assert got.item_stats[0][got.stat_names.index("click_count_5m")] >= 3


def live_click(feature_lake, event_id: str, ts: int, user: int = 1, item: int = 3) -> dict:
    ref = feature_lake.ref
    author = int(ref.keys["author_id"][ref.keys["item_id"] == item][0])
    return {"event_id": event_id, "ts": ts, "user_id": user, "item_id": item, "author_id": author, "action": "click"}


def test_a_future_event_cannot_move_the_clock(online, feature_lake):
    """An event 23 h ahead is skipped: the watermark and the store's times stay within wall-clock + skew."""
    cfg, store = online
    updater, client = start_from_lake(cfg, store), OnlineFeatureClient(cfg, store=store)
    end = int(feature_lake.ref.ts.max())
    before = updater.watermark_ms
    report = updater.update([live_click(feature_lake, "ahead", int(time.time() * 1000) + 23 * 3600 * 1000)])
    assert report.skipped == {"future": 1} and report.events == 0 and updater.watermark_ms == before
    assert updater.update([live_click(feature_lake, "next", end + 1000)]).written  # correct writes still land
    assert client.get(1, [3]).user_stats_asof_ms == end + 1001

    skew_ms = cfg.ingest.max_future_s * 1000
    updater.update([live_click(feature_lake, "slightly-ahead", int(time.time() * 1000) + skew_ms // 2)])
    ceiling = int(time.time() * 1000) + skew_ms
    assert updater.watermark_ms <= ceiling and client.get(1, [3]).user_stats_asof_ms <= ceiling + 1


def test_a_reposted_event_is_counted_once(online, feature_lake):
    cfg, store = online
    updater, client = start_from_lake(cfg, store), OnlineFeatureClient(cfg, store=store)
    click = live_click(feature_lake, "once", int(feature_lake.ref.ts.max()) + 1000)
    updater.update([click])
    first = client.get(1, [3])
    report = updater.update([click, {**click, "ts": click["ts"] + 5}])  # same id, even with another time
    assert report.skipped == {"duplicate": 2} and report.events == 0
    assert_same(client.get(1, [3]), first)


def test_materialising_again_keeps_the_fresher_realtime_rows(online, feature_lake):
    """The batch job re-materialising its range after a live event must not roll the entity back."""
    cfg, store = online
    updater, client = start_from_lake(cfg, store), OnlineFeatureClient(cfg, store=store)
    updater.update([live_click(feature_lake, "fresh", int(feature_lake.ref.ts.max()) + 1000)])
    fresh = client.get(1, [3])
    FeatureJob(cfg).materialize(feature_lake.report, store)
    assert_same(client.get(1, [3]), fresh)
    assert client.get(2, [3]).user_stats_asof_ms < fresh.user_stats_asof_ms  # other users: the batch rows


def test_a_reader_is_not_blocked_by_a_writers_transaction(feature_lake, tmp_path):
    import sqlite3

    cfg = online_config(feature_lake.cfg, tmp_path / "feast", "sqlite")
    store = materialized_store(cfg, feature_lake.report)
    start_from_lake(cfg, store)
    writer = sqlite3.connect(cfg.features.online_store.path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # what a long materialisation holds
    writer.execute(f'UPDATE "{cfg.features.project}_user_stats" SET value = value')
    try:
        started = time.perf_counter()
        assert not OnlineFeatureClient(cfg, store=store).get(1, [3]).user_missing
        assert time.perf_counter() - started < cfg.features.online_store.timeout_ms / 1000
    finally:
        writer.execute("ROLLBACK")
    assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_push_landing_inside_a_redis_batch_write_is_kept(feature_lake, tmp_path, redis_server, monkeypatch):
    """Feast's own Redis store reads each entity's time in one round trip and writes in another, so a push
    landing between the two was rolled back by the older batch row; the guarded store compares and sets on
    the server (features/redis_store.py)."""
    import redis as redis_client
    from redis.client import Pipeline

    redis_client.Redis(port=redis_server.port).flushall()
    cfg = online_config(feature_lake.cfg, tmp_path / "feast", "redis", redis_server)
    store = materialized_store(cfg, feature_lake.report)
    updater = start_from_lake(cfg, store)
    read = lambda: OnlineFeatureClient(cfg, store=store).get(1, [3])  # noqa: E731  (a new client: no item cache)
    # An empty store, as when materialising into a new one: the batch rows are then written, not skipped as
    # equal to what is stored.
    redis_client.Redis(port=redis_server.port).flushall()
    execute, seen = Pipeline.execute, {}

    def push_after_the_first_round_trip(pipe, *args, **kwargs):
        out = execute(pipe, *args, **kwargs)
        if not seen:
            seen["pushed"] = True
            updater.update([live_click(feature_lake, "inside", int(feature_lake.ref.ts.max()) + 1000)])
            seen["fresh"] = read()
        return out

    monkeypatch.setattr(Pipeline, "execute", push_after_the_first_round_trip)
    FeatureJob(cfg).materialize(feature_lake.report, store)
    monkeypatch.undo()
    assert "fresh" in seen
    assert_same(read(), seen["fresh"])
