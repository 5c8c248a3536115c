"""The HTTP API two ways: `served` (the whole Serve application, as tests/serving builds it: proxy, pickled
app, real stages, a landing folder) and `ingress` (the same FastAPI app in process over stub stages, from
bench/hostile.py: fast enough to fuzz with thousands of requests)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.hostile import API_KEY, Stages, in_process_app
from tests.features.conftest import feature_lake  # noqa: F401 (fixture)
from tests.serving.conftest import Served, serving_app

ERROR_BYTES = 4096  # the most an error answer may take


@dataclass
class Ingress:
    """Sends requests to the in-process app on one event loop; `landing` is the stub intake's folder."""

    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    stages: Stages
    landing: Path
    api_key: str = API_KEY

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, path, **kwargs))

    def landed(self) -> list[str]:
        return sorted(p.name for p in self.landing.iterdir())


@pytest.fixture(scope="module")
def served(feature_lake, tmp_path_factory) -> Iterator[Served]:  # noqa: F811 (the imported fixture)
    """The whole Serve application for one module: stopped before the next module's Ray Data jobs run."""
    with serving_app(feature_lake, tmp_path_factory.mktemp("serving")) as app:
        yield app


@pytest.fixture(scope="module")
def ingress(tmp_path_factory) -> Iterator[Ingress]:
    landing = tmp_path_factory.mktemp("landing")
    loop = asyncio.new_event_loop()
    with in_process_app(str(landing)) as (app, stages):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                   base_url="http://ingress", timeout=30)
        yield Ingress(loop, client, stages, landing)
        loop.run_until_complete(client.aclose())
    loop.close()
