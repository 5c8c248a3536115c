"""One Serve instance per serving mode for the serving tests (package scope, cascade then split): the features
tests' small lake, materialised into its own SQLite online store, two toy rankers (to roll one into the other)
and a toy retriever over items 1..30."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from bench.toy import ranker_artifact, retriever_artifact
from config.schema import PlatformConfig
from serving.deploy import base_url, deploy, serve_config, shutdown
from tests.features.conftest import feature_lake, materialized_store, online_config  # noqa: F401 (fixture)
from tests.redis_server import free_port

KEY_ENV = "STREAMREC_TEST_API_KEY"
ITEMS = list(range(1, 31))  # the synthetic lake's items (tests/features/events.py)


@dataclass
class Served:
    cfg: PlatformConfig
    sc: dict
    url: str
    api_key: str
    ranker: Path
    ranker2: Path
    retriever: Path
    http: httpx.Client

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        return self.http.post(self.url + path, json=body, **kwargs)


@dataclass
class Prepared:
    cfg: PlatformConfig
    profile: Path  # the config as a profile file (what `--config` and Serve's app args read)
    ranker: Path
    ranker2: Path
    retriever: Path


def prepare_app(feature_lake, root: Path, mode: str = "cascade") -> Prepared:  # noqa: F811 (the fixture's name)
    """What a Serve application over `feature_lake` needs: its config and online store, two toy rankers and a
    toy retriever, under `root`."""
    cfg = online_config(feature_lake.cfg, root / "feast", "sqlite")
    cfg.serving.mode = mode
    cfg.ingest.landing_dir = str(root / "landing")
    cfg.serving.api_key_env = KEY_ENV
    cfg.serving.num_candidates = 20
    cfg.serving.max_k = 25
    materialized_store(cfg, feature_lake.report)
    profile = root / "profile.yaml"
    profile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sizes = {"num_users": 20, "num_items": 40, "num_authors": 8, "max_hist_len": 8, "d_model": 16}
    ranker = ranker_artifact(root / "ranker", cfg, **sizes).folder
    ranker2 = ranker_artifact(root / "ranker2", cfg, seed=1, name="toy-genrank-v2", **sizes).folder
    retriever = retriever_artifact(root / "retriever", ITEMS, max_len=16, d_model=16).folder
    return Prepared(cfg, profile, ranker, ranker2, retriever)


@contextlib.contextmanager
def serving_app(feature_lake, root: Path, mode: str = "cascade") -> Iterator[Served]:  # noqa: F811 (the fixture's name)
    """The whole Serve application over `feature_lake` in serving `mode`, shut down on exit (its replicas hold the
    test Ray's CPUs: no Ray Data job of a later test would get one)."""
    app = prepare_app(feature_lake, root, mode)
    key = secrets.token_hex(16)
    # The key reaches the ingress through its runtime_env here; on Kubernetes, from a Secret into the pod env.
    sc = serve_config(config=str(app.profile), ranker=str(app.ranker), retriever=str(app.retriever), port=free_port(),
                      deployments={"Ingress": {"ray_actor_options": {"num_cpus": 0.2,
                                                                     "runtime_env": {"env_vars": {KEY_ENV: key}}}}})
    deploy(sc)
    try:
        with httpx.Client(timeout=30) as http:
            yield Served(app.cfg, sc, base_url(sc), key, app.ranker, app.ranker2, app.retriever, http)
    finally:
        shutdown()


@pytest.fixture(scope="package", params=["cascade", "split"])
def served(request, feature_lake, tmp_path_factory) -> Iterator[Served]:  # noqa: F811 (the imported fixture)
    with serving_app(feature_lake, tmp_path_factory.mktemp(f"serving-{request.param}"), request.param) as app:
        yield app
