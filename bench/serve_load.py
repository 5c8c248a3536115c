"""The serving benchmark's load generator: closed- and open-loop /recommend load, background events, freshness
probes, and per-level statistics (latency over all responses and over 200s, goodput, errors by status, CPU).

Users come from one shuffled stream shared by every level of a run, so a level does not re-read the users the
level before it just warmed. Each 200 becomes an engagement (the user clicks the first item recommended) that
an `EventPoster` sends through POST /events at a steady rate: the histories of the users being queried change
while the load runs, so the ranker's per-user prefill cache only hits for a user whose history did not.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import httpx
import numpy as np
import psutil

PERCENTILES = (50, 90, 95, 99)


def now_ms() -> int:
    """Events carry wall-clock time, as producers' do. The demo's online rows are dated when they were
    materialised: an event dated in the lake's past would lose to them ("newer wins") and never show."""
    return int(time.time() * 1000)


def new_click(client, rng: random.Random, users: list[int], n_items: int, event_id: str):
    """A click, stamped now, by a random user on an item not in their history (so its arrival is observable),
    and the user's online features before it: (event, features)."""
    user = rng.choice(users)
    before = client.get(user, [])
    seen = set(before.sequence["item_ids"].tolist())
    item = rng.choice([i for i in range(1, n_items + 1) if i not in seen])
    return {"event_id": event_id, "ts": now_ms(), "user_id": user, "item_id": item, "action": "click"}, before


class UserStream:
    def __init__(self, users: list[int], seed: int = 0):
        self.users = list(users)
        random.Random(seed).shuffle(self.users)
        self.i = 0

    def next(self) -> int:
        self.i += 1
        return self.users[self.i % len(self.users)]


class CpuMeter:
    """CPU seconds since `start()` of this process (the load generator) and of its descendants (the local Ray:
    GCS, raylet, proxy, controller, replicas). A process that exits meanwhile takes its CPU time with it."""

    def __init__(self):
        self.me = psutil.Process()

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        snap = {}
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    snap[p.pid] = (_label(p), t.user + t.system)
            except psutil.Error:
                continue
        return snap

    def start(self) -> None:
        t = self.me.cpu_times()
        self.own0, self.snap0 = t.user + t.system, self._snapshot()

    def stop(self) -> tuple[float, float, dict[str, float]]:
        """(server CPU s, load generator CPU s, server CPU s by process)."""
        t = self.me.cpu_times()
        by: dict[str, float] = defaultdict(float)
        for pid, (label, cpu) in self._snapshot().items():
            by[label] += cpu - self.snap0.get(pid, (label, 0.0))[1]
        return sum(by.values()), t.user + t.system - self.own0, dict(by)


def _label(p: psutil.Process) -> str:
    """Ray names its worker processes after what they run (ray::ServeReplica:streamrec:Ranker, ray::ProxyActor)."""
    cmd = p.cmdline()
    first = os.path.basename(cmd[0]) if cmd else p.name()
    if first.startswith("ray::"):
        return first.split()[0].removeprefix("ray::").replace("ServeReplica:streamrec:", "")
    return next((os.path.basename(a).removesuffix(".py") for a in cmd[1:3] if a.endswith(".py")), first)


class Recorder:
    """One level's /recommend responses."""

    def __init__(self):
        self.all_ms, self.ok_ms, self.codes = [], [], Counter()
        self.stages, self.fallbacks = defaultdict(list), Counter()
        self.lag_ms: list[float] = []  # open loop: scheduled send -> the client starts the request

    def add(self, code: int, ms: float, body: dict | None, lag_ms: float | None = None) -> None:
        self.codes[code] += 1
        if lag_ms is not None:
            self.lag_ms.append(lag_ms)
        self.all_ms.append(ms)
        if code == 200:
            self.ok_ms.append(ms)
            self.fallbacks[str(body["fallback"])] += 1
            for k, v in body["timings_ms"].items():
                self.stages[k].append(v)

    def summary(self, seconds: float) -> dict:
        ok = self.codes.get(200, 0)
        total = sum(self.codes.values())
        out = {"requests": total, "ok": ok, "seconds": round(seconds, 2),
               "goodput_rps": round(ok / seconds, 1), "throughput_rps": round(total / seconds, 1)}
        for name, lat in (("", self.all_ms), ("_ok", self.ok_ms)):
            for q in PERCENTILES:
                out[f"p{q}_ms{name}"] = round(float(np.percentile(lat, q)), 2) if lat else None
        out.update(errors=total - ok, errors_by_status={str(k): v for k, v in sorted(self.codes.items()) if k != 200},
                   share_503=round(self.codes.get(503, 0) / max(total, 1), 3),
                   fallbacks=dict(self.fallbacks),
                   stages_mean_ms={k: round(float(np.mean(v)), 2) for k, v in sorted(self.stages.items())})
        if self.lag_ms:  # how far the load generator itself fell behind its schedule (its share of the latency)
            out.update(client_lag_p50_ms=round(float(np.percentile(self.lag_ms, 50)), 2),
                       client_lag_p99_ms=round(float(np.percentile(self.lag_ms, 99)), 2))
        return out


class EventPoster:
    """Posts the engagements the load produced through POST /events, one request per tick at `rate` per second
    (a client SDK's batching). Engagements a refused post carried are dropped, as a client would after retries."""

    def __init__(self, http: httpx.AsyncClient, key: str, rate: float, max_events: int, prefix: str):
        self.http, self.key, self.rate, self.max_events = http, key, rate, max_events
        self.prefix, self.seq = prefix, 0
        self.pending: list[tuple[int, int]] = []
        self.codes, self.ms, self.events_accepted = Counter(), [], 0

    def engaged(self, user: int, body: dict) -> None:
        if body["items"]:
            self.pending.append((user, body["items"][0]["item_id"]))

    async def run(self, stop: Callable[[], bool]) -> None:
        start, tick = time.perf_counter(), 0
        while not stop():
            tick += 1
            await asyncio.sleep(max(0.0, start + tick / self.rate - time.perf_counter()))
            batch, self.pending = self.pending[-self.max_events:], []
            if batch:
                await self._post(batch)

    async def _post(self, batch: list[tuple[int, int]]) -> None:
        ts = now_ms()
        events = []
        for user, item in batch:
            self.seq += 1
            events.append({"event_id": f"{self.prefix}-{self.seq}", "ts": ts, "user_id": user, "item_id": item,
                           "action": "click"})
        t = time.perf_counter()
        code, _ = await _call(self.http, "/events", events, {"X-API-Key": self.key})
        self.ms.append((time.perf_counter() - t) * 1000)
        self.codes[code] += 1
        self.events_accepted += len(events) if code == 202 else 0

    def summary(self) -> dict:
        return {"posts": sum(self.codes.values()), "events_accepted": self.events_accepted,
                "codes": {str(k): v for k, v in sorted(self.codes.items())},
                "p50_ms": round(float(np.percentile(self.ms, 50)), 2) if self.ms else None,
                "p99_ms": round(float(np.percentile(self.ms, 99)), 2) if self.ms else None}


class Load:
    """One level: a load shape against `url` with the event poster beside it, measured from start to stop."""

    def __init__(self, url: str, users: UserStream, events: dict, max_connections: int):
        self.url, self.users, self.events = url, users, events
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.rec, self.stopped = Recorder(), False

    async def recommend(self, http: httpx.AsyncClient, user: int, started: float | None = None) -> None:
        """One /recommend, timed from `started` (an open loop's scheduled send time) or from now."""
        now = time.perf_counter()
        t = started if started is not None else now
        code, body = await _call(http, "/recommend", {"user_id": user, "k": 10})
        self.rec.add(code, (time.perf_counter() - t) * 1000, body, None if started is None else (now - t) * 1000)
        if body is not None:
            self.poster.engaged(user, body)

    async def closed(self, http: httpx.AsyncClient, concurrency: int, seconds: float) -> None:
        """`concurrency` clients, each sending its next request when the last is answered."""
        end = self.window_end = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < end:
                await self.recommend(http, self.users.next())

        await asyncio.gather(*(client() for _ in range(concurrency)))

    async def open(self, http: httpx.AsyncClient, rate: float, seconds: float | None) -> None:
        """Requests at a fixed rate whatever the answers (until `seconds` or `stop`): latency counts from each
        request's scheduled time, so time spent queueing in the client or server counts too."""
        tasks, start, i = [], time.perf_counter(), 0
        while not self.stopped and (seconds is None or i < rate * seconds):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(self.recommend(http, self.users.next(), scheduled)))
            i += 1
        self.window_end = time.perf_counter()
        await asyncio.gather(*tasks)

    async def run(self, shape: Callable, *args, probe: Callable | None = None) -> dict:
        """Runs `shape(http, *args)`, and `probe(side)` beside it, which ends the level when it returns. The event
        poster and the probe have their own connections: a closed loop's pool is its clients."""
        meter = CpuMeter()
        ev = self.events
        async with (httpx.AsyncClient(base_url=self.url, timeout=30, limits=self.limits) as http,
                    httpx.AsyncClient(base_url=self.url, timeout=30) as side):
            self.poster = EventPoster(side, ev["key"], ev["rate"], ev["max_events"], ev["prefix"])
            poster = asyncio.create_task(self.poster.run(lambda: self.stopped))
            meter.start()
            t0 = time.perf_counter()
            load = asyncio.create_task(shape(http, *args))
            probed = None
            if probe is not None:
                try:
                    probed = await probe(side)
                finally:
                    self.stopped = True  # ends the open-ended load, also when the probe failed
            await load
            elapsed = time.perf_counter() - t0
            self.stopped = True
            await poster
            server_s, loadgen_s, by_process = meter.stop()
        # Rates are per second of sending; answers still arriving after it (the drain) count, their time not.
        out = self.rec.summary(self.window_end - t0)
        out["drain_s"] = round(elapsed - out["seconds"], 2)
        n = max(out["requests"], 1)
        out.update(cpu_ms_per_request=round(server_s * 1000 / n, 2),
                   cpu_ms_per_ok=round(server_s * 1000 / max(out["ok"], 1), 2),
                   loadgen_cpu_ms_per_request=round(loadgen_s * 1000 / n, 2),
                   server_cores_busy=round(server_s / elapsed, 2),
                   cpu_ms_per_request_by_process={k: round(v * 1000 / n, 2) for k, v in
                                                  sorted(by_process.items(), key=lambda kv: -kv[1]) if v > 0.005},
                   events=self.poster.summary())
        if probed is not None:
            out["freshness"] = probed
        return out


async def freshness_probes(http: httpx.AsyncClient, key: str, client, users: list[int],
                           n_items: int, probes: int, timeout_s: float = 10.0, seed: int = 1) -> dict:
    """Per probe: one click of a user on an item not in their history, posted through POST /events, then
    /recommend (debug: it returns the history it used) until that history shows the item and the user's click
    counter (longest window, read from the online store the ranker reads) has counted it. Timed from the POST's
    send to the answer that showed both; probes are spread over the load, not back to back."""
    rng = random.Random(seed)
    counter = client.stat_names.index(f"click_count_{client.spec.window_labels[-1]}")
    headers = {"X-API-Key": key}
    times, post_ms, polls, intake, lost = [], [], [], defaultdict(list), 0
    for p in range(probes):
        event, before = new_click(client, rng, users, n_items, f"probe-{seed}-{p}")
        user, item = event["user_id"], event["item_id"]
        t = time.perf_counter()
        code, accepted = await _call(http, "/events", event, headers)
        post_ms.append((time.perf_counter() - t) * 1000)
        visible = code == 202
        for stage, ms in (accepted or {}).get("timings_ms", {}).items():
            intake[stage].append(ms)
        n = 0
        while visible:
            n += 1
            code, got = await _call(http, "/recommend", {"user_id": user, "k": 10, "debug": True}, headers)
            if (code == 200 and item in got["history_items"]
                    and client.get(user, []).user_stats[counter] > before.user_stats[counter]):
                break
            visible = time.perf_counter() - t < timeout_s
        if visible:
            times.append((time.perf_counter() - t) * 1000)
            polls.append(n)
        else:
            lost += 1
        await asyncio.sleep(rng.uniform(0.05, 0.25))
    return {"probes": probes, "not_visible": lost,
            **{f"p{q}_ms": round(float(np.percentile(times, q)), 1) if times else None for q in (50, 90, 99)},
            "max_ms": round(max(times), 1) if times else None,
            "post_p50_ms": round(float(np.percentile(post_ms, 50)), 1),
            "post_p99_ms": round(float(np.percentile(post_ms, 99)), 1),
            "recommends_until_visible": dict(sorted(Counter(polls).items())),
            # Inside EventIntake (from the 202): the landing file made durable, the online store updated.
            **{f"intake_p{q}_ms": {k: round(float(np.percentile(v, q)), 1) for k, v in intake.items()}
               for q in (50, 99)}}


async def _call(http: httpx.AsyncClient, path: str, body, headers: dict | None = None) -> tuple[int, dict | None]:
    """(status, the JSON of a 2xx answer); -1 when the connection failed."""
    try:
        r = await http.post(path, json=body, headers=headers)
    except httpx.HTTPError:
        return -1, None
    return r.status_code, r.json() if r.is_success else None
