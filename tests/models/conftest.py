"""Model tests use tiny tensors: one torch thread (OpenMP syncing on a busy 2-core runner makes
steps ~20x slower); the overfitting-heavy modules also flush denormals (denormal Adam states are
slow), which they ask for with `pytestmark = pytest.mark.usefixtures("flush_denormals")`.
Not for modules whose hypothesis strategies draw subnormal floats."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
