"""What every serving deployment shares: the platform config from the app's args, paths, stage errors, timing.

The app's args (serving/config.yaml `args`) are `config` (profile name or path), `overrides` (`--set` style)
and `base_dir` (relative paths in config and user_config resolve against it; default: the repository root,
so `serve run serving/config.yaml` works from any folder).

>>> cfg = platform_config({"overrides": ["serving.num_candidates=50"]})
>>> cfg.serving.num_candidates, Path(cfg.lake.root).is_absolute()
(50, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import config
from config.schema import PlatformConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# Per-process limits of the HTTP ingress (body size, API key), set by the Ingress from config (see serving.app).
INGRESS_LIMITS: dict[str, Any] = {"max_body_bytes": 1 << 20, "api_key": None}


class StageUnavailable(RuntimeError):
    """A stage (retriever, ranker) has no model loaded or cannot answer: the ingress falls back."""


# The words /healthz uses for a configured artifact that did not load (after "ranker: " or "retriever: ");
# deploys match them (serving.deploy.wait_for_versions, k8s/pipeline update_serving). No path: the log has it.
LOAD_FAILED = "artifact failed to load"


def load_failed(err: Exception) -> str:
    """`artifact failed to load (ValueError: sha256 does not match the manifest)`: the reason the artifact code
    gives after its last "<where>: ", and only when it names no path or host (then the type alone)."""
    reason = str(err).rsplit(": ", 1)[-1].strip()
    if not reason or "/" in reason or len(reason) > 160:
        return f"{LOAD_FAILED} ({type(err).__name__})"
    return f"{LOAD_FAILED} ({type(err).__name__}: {reason})"


def base_dir(args: dict[str, Any] | None) -> Path:
    return Path((args or {}).get("base_dir") or REPO_ROOT).resolve()


def resolve(path: str | None, args: dict[str, Any] | None) -> str | None:
    """A local path relative to the app's base_dir made absolute; URIs (s3://...) and None pass through."""
    if not path or "://" in path:
        return path
    return str((base_dir(args) / path).resolve())


def platform_config(args: dict[str, Any] | None, extra_overrides: list[str] | None = None) -> PlatformConfig:
    """The typed config named by the app's args, local paths made absolute against base_dir."""
    from features.repo import absolute_paths

    args = args or {}
    cfg = config.load(args.get("config"), [*args.get("overrides", []), *(extra_overrides or [])])
    cfg = absolute_paths(cfg, base_dir(args))
    if "://" not in cfg.ingest.landing_dir:
        cfg.ingest.landing_dir = resolve(cfg.ingest.landing_dir, args)
    return cfg


def setting(user_config: dict[str, Any], key: str, default, kind: type = float):
    """user_config[key] as `kind` (default when absent); a value of another kind is an error naming the key."""
    value = user_config.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"user_config {key}={value!r}: want a {kind.__name__}") from None


class Timer:
    """Named stage timings in milliseconds: `with timer("retrieval"): ...`."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str) -> _Span:
        return _Span(self, name)

    def total(self) -> float:
        self.ms["total"] = round((time.perf_counter() - self._start) * 1000, 3)
        return self.ms["total"]


class _Span:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> _Span:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.ms[self.name] = round((time.perf_counter() - self.t0) * 1000, 3)


class BusyBatchWait:
    """Runs a `@serve.batch` method's batches in a thread and sets its batch wait per request: 0 while no batch
    runs, `busy_s` while one does.

    Serve's batch loop waits `batch_wait_timeout_s` after a batch's first request for more, and forms the next
    batch while the current one runs. A fixed wait costs every request that wait at low load; with none, a
    busy replica runs a queue of 1-request batches. Waiting only pays while an earlier batch still runs (the new
    one could not start anyway), so that is when it waits. A batch run in a thread leaves the event loop free to
    take the requests that form the next one. Call `before_request()` before calling the batched method, and
    `await run(fn, ...)` for the batch's work inside it.
    """

    def __init__(self, batched, busy_s: float = 0.01):
        self.batched, self.busy_s, self.in_flight = batched, busy_s, 0

    def configure(self, user_config: dict[str, Any], default_size: int) -> None:
        """user_config keys batch_size and batch_wait_timeout_s (the wait while a batch runs)."""
        self.batched.set_max_batch_size(int(user_config.get("batch_size", default_size)))
        self.busy_s = float(user_config.get("batch_wait_timeout_s", 0.01))

    def before_request(self) -> None:
        self.batched.set_batch_wait_timeout_s(self.busy_s if self.in_flight else 0.0)

    async def run(self, fn, *args):
        self.in_flight += 1
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.in_flight -= 1


class ModelSlot:
    """One stage's model, swapped in only once loaded: `await slot.load(artifact, build)` loads a new artifact in a
    thread while the old model keeps answering; a failed load keeps the old one and says why in `error` (for
    /healthz; the log has the path). Used by the Retriever and Ranker deployments and by the cascade Ingress."""

    def __init__(self, stage: str):
        self.stage = stage
        self.model: Any = None
        self.artifact: str | None = None
        self.error: str | None = f"no {stage} artifact configured"

    @property
    def version(self) -> str | None:
        return self.model.version if self.model is not None else None

    async def load(self, artifact: str | None, build) -> bool:
        """Serve `artifact` (None: serve nothing); `build(artifact)` makes the model. True when a model was built."""
        if artifact is None:
            self.model, self.artifact, self.error = None, None, f"no {self.stage} artifact configured"
            return False
        if artifact == self.artifact and self.model is not None:
            self.error = None  # back to the artifact it serves (a rollback after a failed load): that error is over
            return False
        try:
            model = await asyncio.to_thread(build, artifact)
        except Exception as err:  # keep serving what is loaded (or nothing)
            self.error = load_failed(err)
            logging.getLogger("ray.serve").error("%s artifact %s: %s", self.stage, artifact, err)
            return False
        self.model, self.artifact, self.error = model, artifact, None
        return True

    def problems(self) -> list[str]:
        return [] if self.model is not None and self.error is None else [f"{self.stage}: {self.error}"]


# A follower asks again at least this often; one not heard from for twice as long is gone.
FOLLOW_WAIT_S = 5.0


class SettingsBoard:
    """A stage deployment's user_config, handed to the cascade Ingress replicas that run the stage in process.

    In cascade mode the Retriever and Ranker deployments keep their user_config (where deploys and the cluster
    pipeline roll artifacts in) but load no model: each Ingress replica follows the board (`follow`, a long
    poll) and applies what it gets. Settings are named by their content (`token`), so replicas of one stage
    deployment, which all hold the same user_config, agree on what is current. Serve routes no request to a
    replica while its reconfigure runs, so `publish` cannot wait for the followers' acknowledgements; `behind`
    names the followers alive at the last publish that have not applied it yet (serving.deploy.set_user_config
    waits for none). The long poll is short: a replica shutting down waits for the one in flight."""

    def __init__(self):
        self.token, self.user_config = "", {}
        self.followers: dict[str, tuple[str, float]] = {}  # follower -> (token applied, last heard)
        self.expected: list[str] = []
        self._changed: asyncio.Event | None = None

    def publish(self, user_config: dict[str, Any]) -> None:
        self.user_config = dict(user_config or {})
        self.token = hashlib.sha256(json.dumps(self.user_config, sort_keys=True, default=str).encode()).hexdigest()
        now = time.monotonic()
        self.followers = {f: v for f, v in self.followers.items() if now - v[1] < 60 * FOLLOW_WAIT_S}
        self.expected = [f for f, (_, heard) in self.followers.items() if now - heard < 2 * FOLLOW_WAIT_S]
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def follow(self, follower: str, applied: str, wait_s: float = FOLLOW_WAIT_S) -> tuple[str, dict]:
        """(token, user_config) once they differ from what the follower `applied`, or after `wait_s`."""
        self.followers[follower] = (applied, time.monotonic())
        if applied == self.token:
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
        return self.token, self.user_config

    def behind(self) -> list[str]:
        return [f for f in self.expected if f in self.followers and self.followers[f][0] != self.token]


class StageDeployment:
    """What the Retriever and Ranker deployments share: one model slot, the batch wait of their `@serve.batch`
    method `_batched`, and in cascade mode (serving.mode) the settings board the Ingress replicas follow instead
    of a model loaded here. A subclass sets `stage`, `does` (what it does itself, for split mode's error) and
    `default_batch_size`, and calls `_init_stage(cascade)` in its constructor."""

    stage: str
    does: str
    default_batch_size: int

    def _init_stage(self, cascade: bool) -> None:
        self.board = SettingsBoard() if cascade else None
        self.slot = ModelSlot(self.stage)
        self.batch_wait = BusyBatchWait(self._batched)

    def _published(self, user_config: dict[str, Any]) -> bool:
        """Cascade mode: hand `user_config` to the Ingress replicas (True: nothing to load here). Otherwise apply
        this replica's torch threads and batching and return False."""
        if self.board is not None:
            self.board.publish(user_config)
            return True
        if user_config.get("torch_threads"):  # Serve's defaults leave torch on all cores; one thread scales better
            import torch  # here, not at the top: serving.deploy (a CLI) imports this module and needs no torch

            torch.set_num_threads(int(user_config["torch_threads"]))
        self.batch_wait.configure(user_config, default_size=self.default_batch_size)
        return False

    async def follow(self, follower: str, applied: str) -> tuple[str, dict]:
        """Cascade mode: this deployment's user_config, once it differs from `applied` (SettingsBoard.follow)."""
        if self.board is None:
            raise StageUnavailable(f"split mode: the {self.stage.title()} {self.does} itself")
        return await self.board.follow(follower, applied)

    async def settings_behind(self) -> list[str]:
        """Cascade mode: the Ingress replicas that have not applied this user_config yet (SettingsBoard.behind)."""
        return self.board.behind() if self.board is not None else []

    async def loaded(self) -> dict[str, str | None]:
        """The version of the model answering now (a failed reload leaves the old one)."""
        return {"version": self.slot.version}
