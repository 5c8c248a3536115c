"""Shared fixtures for the deployment tests: rendered overlays and the KubeRay CRD folder."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest

from k8s import kustomize, validate

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["dev", "prod"]


@functools.cache
def _render(folder: str) -> tuple:
    return tuple(kustomize.render(ROOT / folder))


def rendered(folder: str) -> list[dict]:
    """A fresh copy of a rendered kustomization (tests may mutate it)."""
    return copy.deepcopy(list(_render(folder)))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


@pytest.fixture(scope="session")
def crds() -> Path:
    folder = validate.crds_dir()
    if not folder.is_dir():
        pytest.skip(f"KubeRay CRDs not found: {folder} is missing (set {validate.CRDS_ENV})")
    return folder
