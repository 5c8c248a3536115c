"""Every `>>>` example in the project's modules runs, and a module that shows `>>>` runs at least one.

A module whose docstrings contain `>>>` but whose examples doctest does not find (a commented-out
example, a prompt inside a code string) would otherwise pass with nothing checked, so that fails too.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("config", "storage", "ingestion", "features", "models", "training", "serving", "ray_jobs", "bench")


def modules_with_examples() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if ">>>" in path.read_text():
                dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
                found.append(dotted.removesuffix(".__init__"))
    return found


MODULES = modules_with_examples()


def test_the_runner_finds_modules():
    assert len(MODULES) >= 40, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} shows `>>>` but doctest found no example to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
