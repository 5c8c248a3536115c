"""The synthetic live-stream world behind `ingestion.simulator`: who is on air, what gets shown, who clicks.

One `World.step(t0, t1)` simulates every recommendation request in a slice of time at once (numpy over
the batch of requests x K impressions), returns the resulting events as columns, then updates the
state the next step depends on. State is O(users + items) arrays, never O(events), so a stream of any
length runs in bounded memory. All randomness comes from one Generator consumed in a fixed order, so
the seed fixes every event.

What carries signal (and what a ranker can learn from the logs):
- long-term interest: user vector . item vector (users' vectors drift as a random walk);
- short-term interest: a decaying average of the vectors of items the user clicked in the last hours
  (so recent history predicts the next click: sequence models help);
- popularity: power law over streamers, inherited by their videos;
- momentum: every item has a "hype" process (stronger for live rooms), and every item's click rate in
  the last minutes versus its last hours feeds back into its click probability (so 5-minute windowed
  stats help);
- habits: users follow streamers; followed streamers are shown more and clicked more;
- position bias, and live rooms being more clickable than videos.
"""

from __future__ import annotations

import numpy as np

from config.schema import SimulatorConfig
from ingestion.contract import ACTION_INDEX

DAY_S = 86400.0
DIM = 16  # latent dimension of users' and items' interest vectors
FOLLOW_SLOTS = 8  # a user's followed streamers, a ring buffer (newest replaces oldest)

# Relative traffic per UTC hour: quiet before dawn, a lunch bump, peak late evening. Mean 1.
HOURLY = np.array([0.9, 0.6, 0.4, 0.3, 0.25, 0.3, 0.45, 0.65, 0.8, 0.85, 0.9, 1.0,
                   1.1, 1.0, 0.95, 0.95, 1.0, 1.1, 1.3, 1.55, 1.8, 1.9, 1.7, 1.3])
HOURLY = HOURLY / HOURLY.mean()

# Click model (logit terms); coefficients chosen for a CTR of a few percent and clear, learnable signal.
CLICK_BIAS = -3.9
W_AFFINITY = 2.0   # x long-term user.item
W_SHORT = 1.8      # x short-term interest.item
W_POP = 0.3        # x log relative popularity
W_TREND = 0.8      # x log(recent click rate / usual click rate)
W_FOLLOW = 1.2     # the user follows the item's author
W_LIVE = 0.3       # live rooms are more clickable than videos
POSITION_DECAY = 0.12  # logit lost per slot down the list

TREND_FAST_S = 300.0     # "now": a 5-minute decay
TREND_SLOW_S = 21600.0   # "usual": a 6-hour decay
SHORT_TERM_S = 3600.0    # short-term interest fades over about an hour
HYPE_S = 1200.0  # hype: an Ornstein-Uhlenbeck process per item with a 20-minute memory
HYPE_SD_LIVE, HYPE_SD_VIDEO = 0.9, 0.5
DRIFT_PER_DAY = 0.3      # length of a user's interest random-walk step per sqrt(day)

# Logging policy: where each of the K impression slots comes from.
SOURCE_CDF = np.cumsum([0.15, 0.30, 0.20, 0.25, 0.10])  # follow, personalised, popular, live now, random
LIVE_BOOST = 5.0  # the personalised source favours live rooms: the feed promotes streams on air

# Sessions: after a request the user comes back for another with these odds (without / with a click).
CONTINUE_P = np.array([0.5, 0.75])
MEAN_SESSION_REQUESTS = 2.5  # about 1 / (1 - CONTINUE_P averaged over requests)

ENGAGEMENTS = ("like", "comment", "share", "follow", "gift")
ENGAGEMENT_CODES = np.array([ACTION_INDEX[a] for a in ENGAGEMENTS], np.int8)
GIFT_TIERS = np.array([1.0, 5.0, 10.0, 30.0, 99.0, 199.0, 520.0, 1314.0])

# The click logit's terms, as each impression's `terms` row (the oracle writes them, so an evaluation can ask
# which of them a model learned); the logit is CLICK_BIAS + their sum.
LOGIT_TERMS = ("affinity", "short_term", "follow", "item", "trend", "hype", "position")
COLUMNS = ("t", "user", "item", "action", "request", "value", "p_click", "terms", "clicked", "position")


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def activity(t_abs_s: float) -> float:
    """Traffic multiplier at an absolute UTC time (seconds), interpolated between hours."""
    h = (t_abs_s % DAY_S) / 3600.0
    lo = int(h)
    return float(HOURLY[lo] + (HOURLY[(lo + 1) % 24] - HOURLY[lo]) * (h - lo))


def draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: index i with probability (cdf[i] - cdf[i-1]) / cdf[-1]."""
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)


def draw_rows(weights: np.ndarray, rows: np.ndarray | int, u: np.ndarray) -> np.ndarray:
    """For each (row, uniform) an index drawn from that row of `weights` (m x n, rows with positive
    sums) with probability proportional to weight. One cumsum and one searchsorted serve every row:
    row r's normalised cdf is shifted into [r, r + 1] (numpy's cost here is per call, not per element)."""
    m, n = weights.shape
    cdf = np.cumsum(weights, axis=1)
    flat = (cdf / cdf[:, -1:] + np.arange(m)[:, None]).ravel()
    return np.clip(np.searchsorted(flat, rows + u, side="right") - rows * n, 0, n - 1)


class TopicSampler:
    """Draws, for each requested topic, an item of that topic with probability proportional to a weight."""

    def __init__(self, topic: np.ndarray, n_topics: int):
        self.order = np.argsort(topic, kind="stable")
        counts = np.bincount(topic, minlength=n_topics)
        self.end = np.cumsum(counts)
        self.start = self.end - counts

    def sample(self, weights: np.ndarray, topics: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (items, ok); ok is False where the topic has no weight (caller picks a fallback)."""
        cdf = np.concatenate([[0.0], np.cumsum(weights[self.order])])
        lo, hi = cdf[self.start[topics]], cdf[self.end[topics]]
        pos = np.searchsorted(cdf, lo + u * (hi - lo), side="right") - 1
        pos = np.clip(pos, self.start[topics], np.maximum(self.end[topics] - 1, self.start[topics]))
        return self.order[np.minimum(pos, len(self.order) - 1)], hi > lo


def concat_events(parts: list[dict]) -> dict:
    return {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}


def take_events(ev: dict, idx: np.ndarray) -> dict:
    return {c: ev[c][idx] for c in COLUMNS}


class World:
    def __init__(self, cfg: SimulatorConfig, rng: np.random.Generator, start_s: float):
        self.rng, self.start_s, self.k = rng, start_s, cfg.impressions_per_request
        self.n_users, self.n_streamers, self.n_videos = cfg.users, cfg.streamers, cfg.videos_per_streamer
        U, S, V, T = cfg.users, cfg.streamers, cfg.videos_per_streamer, cfg.topics
        if self.k > S * V:  # videos are always available; live rooms may all be off air
            raise ValueError(f"simulator: streamers x videos_per_streamer = {S * V} must be at least "
                             f"impressions_per_request = {self.k}, so that every request has enough to show")
        self.n_items = S * (1 + V)
        self.sessions_per_s = U * cfg.sessions_per_user_day / DAY_S
        # Topics have a popularity of their own; vectors are noisy copies of topic centroids.
        self.centroids = normalise(rng.normal(size=(T, DIM)))
        topic_p = np.arange(1, T + 1) ** -0.7
        topic_cdf = np.cumsum(topic_p / topic_p.sum())
        # Items: index s < S is streamer s's live room, S + s*V + j is streamer s's video j.
        streamer_topic = draw(topic_cdf, rng.random(S))
        video_author = np.repeat(np.arange(S), V)
        own_topic = rng.random(S * V) < 0.8
        video_topic = np.where(own_topic, streamer_topic[video_author], rng.integers(T, size=S * V))
        self.item_author = np.concatenate([np.arange(S), video_author])
        self.item_topic = np.concatenate([streamer_topic, video_topic])
        noise = rng.normal(size=(self.n_items, DIM))
        self.item_vec = normalise(self.centroids[self.item_topic] + 0.35 * noise)
        self.is_live = np.arange(self.n_items) < S
        # Power-law popularity: streamer of rank r has weight r^-1.1; videos inherit it with spread.
        streamer_pop = (rng.permutation(S) + 1.0) ** -1.1
        pop = np.concatenate([streamer_pop, streamer_pop[video_author] * rng.lognormal(0, 0.8, S * V)])
        self.pop = pop / pop.mean()
        # Per-item constants, computed once (numpy's per-call cost dominates a step).
        self.item_logit = W_POP * np.log(self.pop) + W_LIVE * self.is_live
        self.personal_weight = np.sqrt(self.pop) * np.where(self.is_live, LIVE_BOOST, 1.0)
        self.position_logit = -POSITION_DECAY * np.arange(self.k)
        self.earlier = np.tri(self.k, k=-1, dtype=bool)
        self.video_len = np.clip(rng.lognormal(np.log(45), 0.8, self.n_items), 8, 600)
        # Schedules: a daily show starting mostly at busy hours, 1.5-6 h long, on a share of the days.
        hour_cdf = np.cumsum(HOURLY)
        self.show_start = (draw(hour_cdf, rng.random(S)) + rng.random(S)) * 3600.0
        self.show_len = rng.uniform(1.5, 6.0, S) * 3600.0
        self.show_days = rng.uniform(0.5, 0.95, S)
        # Who airs today is drawn once per day; start with "yesterday" so last night's shows run on.
        self.day = int(start_s // DAY_S) - 1
        self.airs_today = rng.random(S) < self.show_days
        self.hype_sd = np.where(self.is_live, HYPE_SD_LIVE, HYPE_SD_VIDEO)
        self.hype = rng.normal(0, self.hype_sd)
        # Users: a mix of two topics, heavy-tailed activity and spending.
        t1, t2 = draw(topic_cdf, rng.random(U)), draw(topic_cdf, rng.random(U))
        w = rng.uniform(0.5, 1.0, (U, 1))
        self.theta = normalise(w * self.centroids[t1] + (1 - w) * self.centroids[t2]
                               + 0.3 * rng.normal(size=(U, DIM))).astype(np.float32)
        self.theta_t = np.zeros(U)
        self.user_cdf = np.cumsum(rng.lognormal(0, 1.0, U))
        self.spend = rng.lognormal(0, 1.2, U)
        self.short_sum = np.zeros((U, DIM), np.float32)
        self.short_w = np.zeros(U)
        self.short_t = np.zeros(U)
        self.topics = TopicSampler(self.item_topic, T)
        # Habits to start from: each user follows ~2 streamers close to their taste.
        self.follows = np.full((U, FOLLOW_SLOTS), -1, np.int64)
        self.follow_next = np.zeros(U, np.int64)
        n_follow = np.minimum(rng.poisson(2.0, U), FOLLOW_SLOTS)
        fav = np.where(rng.random((U, FOLLOW_SLOTS)) < 0.7, t1[:, None], t2[:, None])
        picked, ok = self.topics.sample(self.pop * self.is_live, fav, rng.random((U, FOLLOW_SLOTS)))
        keep = ok & (np.arange(FOLLOW_SLOTS) < n_follow[:, None])
        self.follows[keep] = self.item_author[picked[keep]]
        self.follow_next[:] = n_follow
        # Momentum: decayed click counts per item, fast ("now") and slow ("usual").
        self.clicks_fast = np.zeros(self.n_items)
        self.clicks_slow = np.zeros(self.n_items)
        self.trend = np.zeros(self.n_items)
        # Sessions: requests that follow an earlier one of the same user.
        self.next_t = np.zeros(0)
        self.next_user = np.zeros(0, np.int64)
        self.n_requests = 0

    def expected_requests_per_s(self, t: float) -> float:
        return self.sessions_per_s * activity(self.start_s + t) * MEAN_SESSION_REQUESTS

    # -- schedules --------------------------------------------------------------------------
    def on_air(self, t: float) -> np.ndarray:
        t_abs = self.start_s + t
        day = int(t_abs // DAY_S)
        while self.day < day:
            self.day += 1
            self.airs_yesterday = self.airs_today
            self.airs_today = self.rng.random(self.n_streamers) < self.show_days
        since = (t_abs % DAY_S - self.show_start) % DAY_S  # seconds since today's (or last night's) start
        started_today = t_abs % DAY_S >= self.show_start
        airs = np.where(started_today, self.airs_today, self.airs_yesterday)
        return airs & (since < self.show_len)

    # -- one step ---------------------------------------------------------------------------
    def step(self, t0: float, t1: float) -> dict:
        rng = self.rng
        live_now = self.on_air((t0 + t1) / 2)
        avail = np.concatenate([live_now, np.ones(self.n_items - self.n_streamers, bool)]).astype(float)
        users, ts = self._requests(t0, t1)
        items = self._policy(users, avail, live_now)
        p_click, personal, terms = self._click_model(users, ts, items)
        clicked = rng.random(p_click.shape) < p_click
        events, watch_by_request = self._outcomes(users, ts, items, p_click, terms, clicked, personal)
        self._continue_sessions(users, ts, clicked, watch_by_request)
        self._update(t0, t1, users[np.nonzero(clicked)[0]], items[clicked], events)
        self.n_requests += len(users)
        return events

    def _requests(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        n_new = rng.poisson(self.sessions_per_s * (t1 - t0) * activity(self.start_s + (t0 + t1) / 2))
        due = self.next_t < t1
        users = np.concatenate([self.next_user[due], draw(self.user_cdf, rng.random(n_new))])
        # A return that fell inside the previous step's span happens just after this step starts.
        back = self.next_t[due]
        late = t0 + np.minimum(rng.exponential(10.0, len(back)), t1 - t0) * 0.999
        ts = np.concatenate([np.where(back >= t0, back, late), rng.uniform(t0, t1, n_new)])
        self.next_t, self.next_user = self.next_t[~due], self.next_user[~due]
        # Interests drift while a user is away: a random-walk step of length ~DRIFT_PER_DAY * sqrt(days),
        # kept on the unit sphere (taste is a direction; its scale stays that of the click model).
        uniq, first = np.unique(users, return_index=True)
        days = np.maximum(ts[first] - self.theta_t[uniq], 0) / DAY_S
        step = DRIFT_PER_DAY / np.sqrt(DIM) * np.sqrt(days)[:, None] * rng.normal(size=(len(uniq), DIM))
        self.theta[uniq] = normalise(self.theta[uniq] + step)
        self.theta_t[uniq] = ts[first]
        return users, ts

    def _policy(self, users: np.ndarray, avail: np.ndarray, live_now: np.ndarray) -> np.ndarray:
        """The logging policy: each of K slots is a followed streamer, a personalised pick, a popular
        (and trending) pick, a live room on air or a random one; duplicates within a request are replaced
        by random picks."""
        rng, (B, K) = self.rng, (len(users), self.k)
        source = draw(SOURCE_CDF, rng.random((B, K)))
        trending = self.pop * avail * np.exp(0.5 * self.trend)
        # Nobody on air (tiny worlds at night): the live slots go to popular items.
        live_weights = trending * self.is_live if live_now.any() else trending
        sources = np.stack([trending, live_weights, avail])
        popular, live, random = draw_rows(sources, np.arange(3)[:, None, None], rng.random((3, B, K)))
        # Personalised: a topic drawn from a sharpened softmax of the user's taste, then an item of it.
        logits = 4.0 * self.theta[users] @ self.centroids.T
        taste = np.exp(logits - logits.max(1, keepdims=True))
        topic = draw_rows(taste, np.arange(B)[:, None], rng.random((B, K)))
        weights = self.personal_weight * avail
        personal, ok = self.topics.sample(weights, topic, rng.random((B, K)))
        personal = np.where(ok, personal, popular)
        # Follow: a followed streamer's live room when on air, else one of their videos.
        author = self.follows[users[:, None], rng.integers(FOLLOW_SLOTS, size=(B, K))]
        a = np.maximum(author, 0)
        video = self.n_streamers + a * self.n_videos + rng.integers(self.n_videos, size=(B, K))
        followed = np.where(live_now[a], a, video)
        followed = np.where(author >= 0, followed, personal)
        items = np.choose(source, [followed, personal, popular, live, random])
        for _ in range(3):
            eq = items[:, :, None] == items[:, None, :]
            dup = (eq & self.earlier).any(2)  # same item earlier in the row
            if not dup.any():
                break
            items[dup] = draw_rows(avail[None], 0, rng.random(int(dup.sum())))
        return items

    def _click_model(self, users, ts, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """True click probability per impression, the personal part of its logit (reused for how long and how
        warmly a clicking user engages), and the logit's terms [B, K, len(LOGIT_TERMS)]."""
        vec = self.item_vec[items]
        affinity = np.einsum("bd,bkd->bk", self.theta[users], vec)
        decay = np.exp(-(ts - self.short_t[users]) / SHORT_TERM_S)
        short = self.short_sum[users] * decay[:, None] / (self.short_w[users] * decay + 1.0)[:, None]
        short_aff = np.einsum("bd,bkd->bk", short, vec)
        author = self.item_author[items]
        follows = (self.follows[users][:, None, :] == author[:, :, None]).any(-1)
        terms = [W_AFFINITY * affinity, W_SHORT * short_aff, W_FOLLOW * follows, self.item_logit[items],
                 W_TREND * self.trend[items], self.hype[items], np.broadcast_to(self.position_logit, items.shape)]
        personal = terms[0] + terms[1] + terms[2]
        logit = CLICK_BIAS + personal  # then the other terms, one at a time: the sum's rounding fixes every event
        for term in terms[3:]:
            logit = logit + term
        return sigmoid(logit), personal + 2.0 * follows, np.stack(terms, axis=-1)  # following deepens engagement

    def _outcomes(self, users, ts, items, p_click, terms, clicked, personal) -> tuple[dict, np.ndarray]:
        """Impressions for every slot; for clicked ones a click, a view with seconds watched, and
        likes / comments / shares / follows / gifts at realistic conditional rates."""
        rng, (B, K) = self.rng, items.shape
        req = self.n_requests + np.arange(B)
        impressions = {"t": np.repeat(ts, K), "user": np.repeat(users, K), "item": items.ravel(),
                       "action": np.full(B * K, ACTION_INDEX["impression"], np.int8),
                       "request": np.repeat(req, K), "value": np.full(B * K, np.nan),
                       "p_click": p_click.ravel().astype(np.float32),
                       "terms": terms.reshape(B * K, len(LOGIT_TERMS)).astype(np.float32),
                       "clicked": clicked.ravel(),
                       "position": np.tile(np.arange(K, dtype=np.int8), B)}
        b, k = np.nonzero(clicked)
        n = len(b)
        u, it, pers = users[b], items[b, k], personal[b, k]
        live = self.is_live[it]
        t_click = ts[b] + 1.0 + 0.4 * k + rng.exponential(2.0, n)
        watch_live = np.clip(rng.lognormal(np.log(90) + 0.4 * pers, 1.1), 2, 4 * 3600)
        frac = np.clip(sigmoid(0.5 + 0.8 * pers + rng.normal(0, 1, n)), 0.03, 1.0)
        watch = np.round(np.where(live, watch_live, np.maximum(self.video_len[it] * frac, 1.0)), 1)
        warmth = np.where(live, np.minimum(watch / 600.0, 1.0), frac)  # how engaged the viewing was
        already = (self.follows[u] == self.item_author[it][:, None]).any(1)
        spend = 0.9 * np.log(self.spend[u])
        logits = np.stack([-4.3 + 0.8 * pers + 1.5 * warmth,  # columns follow ENGAGEMENTS
                           -6.0 + 0.6 * pers + 1.2 * live + 1.0 * warmth,
                           -6.4 + 0.6 * pers + 0.8 * warmth,
                           np.where(already, -np.inf, -5.4 + 0.8 * pers + 0.8 * live + 1.0 * warmth),
                           np.where(live, -5.0 + spend + 0.5 * pers + 1.0 * warmth, -np.inf)], axis=1)
        row, col = np.nonzero(rng.random(logits.shape) < sigmoid(logits))
        t_engaged = t_click[row] + rng.uniform(0.1, 1.0, len(row)) * watch[row]  # during the watch
        gift_value = np.full(len(row), np.nan)
        gifts = col == ENGAGEMENTS.index("gift")  # bigger spenders pick bigger gift tiers
        gift_value[gifts] = GIFT_TIERS[np.minimum(rng.poisson(0.25 * self.spend[u[row[gifts]]]),
                                                  len(GIFT_TIERS) - 1)]
        src = np.concatenate([np.arange(n), np.arange(n), row])  # which click each outcome belongs to
        m = len(src)
        action = np.concatenate([np.full(n, ACTION_INDEX["click"], np.int8),
                                 np.full(n, ACTION_INDEX["view"], np.int8), ENGAGEMENT_CODES[col]])
        outcomes = {"t": np.concatenate([t_click, t_click + watch, t_engaged]), "user": u[src],
                    "item": it[src], "action": action,
                    "request": req[b][src], "value": np.concatenate([np.full(n, np.nan), watch, gift_value]),
                    "p_click": np.full(m, np.nan, np.float32),
                    "terms": np.full((m, len(LOGIT_TERMS)), np.nan, np.float32),
                    "clicked": np.zeros(m, bool),
                    "position": np.full(m, -1, np.int8)}
        return concat_events([impressions, outcomes]), np.bincount(b, weights=watch, minlength=B)

    def _continue_sessions(self, users, ts, clicked, watch_by_request) -> None:
        """Sessions: a user comes back for another request after watching, more often after a click."""
        rng = self.rng
        again = rng.random(len(users)) < CONTINUE_P[clicked.any(1).astype(int)]
        gap = watch_by_request + 5.0 + rng.exponential(20.0, len(users))
        self.next_t = np.concatenate([self.next_t, (ts + gap)[again]])
        self.next_user = np.concatenate([self.next_user, users[again]])

    def _update(self, t0, t1, click_users, click_items, events) -> None:
        rng, dt = self.rng, t1 - t0
        # Momentum: decay both click counters, add this step's clicks, compare "now" with "usual".
        counts = np.bincount(click_items, minlength=self.n_items)
        self.clicks_fast = self.clicks_fast * np.exp(-dt / TREND_FAST_S) + counts
        self.clicks_slow = self.clicks_slow * np.exp(-dt / TREND_SLOW_S) + counts
        self.trend = np.log((self.clicks_fast + 1.0) / (self.clicks_slow * TREND_FAST_S / TREND_SLOW_S + 1.0))
        # Short-term interest: decay to t1, then add the clicked items' vectors.
        uniq = np.unique(click_users)
        decay = np.exp(-(t1 - self.short_t[uniq]) / SHORT_TERM_S)
        self.short_sum[uniq] *= decay[:, None].astype(np.float32)
        self.short_w[uniq] *= decay
        self.short_t[uniq] = t1
        np.add.at(self.short_sum, click_users, self.item_vec[click_items].astype(np.float32))
        np.add.at(self.short_w, click_users, 1.0)
        # Habits: new follows go into the user's ring buffer.
        new = events["action"] == ACTION_INDEX["follow"]
        fu, fa = events["user"][new], self.item_author[events["item"][new]]
        self.follows[fu, self.follow_next[fu] % FOLLOW_SLOTS] = fa
        np.add.at(self.follow_next, fu, 1)
        # Hype: an Ornstein-Uhlenbeck step per item.
        keep = np.exp(-dt / HYPE_S)
        self.hype = self.hype * keep + self.hype_sd * np.sqrt(1 - keep**2) * rng.normal(size=self.n_items)
