"""The verified beam search against exhaustive search: with beams enough for every valid prefix it is exact."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.nezha_decode import beam_search
from models.semantic_ids import SemanticIdIndex, mixed_radix_encode, with_collision_code


def _path_model(radices, requests: int, seed: int):
    """Log-probabilities that depend on the request and the whole prefix (as a model's do), and a `step` for them."""
    g = torch.Generator().manual_seed(seed)
    tables = [torch.log_softmax(torch.randn(requests, 97, t, generator=g), -1) for t in radices]

    def logp(level: int, request: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return tables[level][request, (prefix * 31 + level) % 97]

    state = {"req": torch.arange(requests), "prefix": torch.zeros(requests, dtype=torch.long)}

    def step(level: int, parent: torch.Tensor, codes: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        state["req"] = state["req"][parent]
        state["prefix"] = state["prefix"][parent] * radices[level - 1] + codes + 1
        return logp(level, state["req"], state["prefix"])

    first = logp(0, torch.arange(requests), torch.zeros(requests, dtype=torch.long))
    return first, step, logp


def _exhaustive(codes: torch.Tensor, radices, requests: int, logp, exclude) -> list[dict[int, float]]:
    """Per request, every item not excluded -> its summed log-probability along its codes."""
    out = []
    for r in range(requests):
        scored = {}
        for item, path in enumerate(codes.tolist(), start=1):
            if item in exclude[r]:
                continue
            prefix, total = 0, 0.0
            for level, code in enumerate(path):
                total += float(logp(level, torch.tensor([r]), torch.tensor([prefix]))[0, code])
                prefix = prefix * radices[level] + code + 1
            scored[item] = total
        out.append(scored)
    return out


@settings(max_examples=40, deadline=None)
@given(levels=st.integers(1, 3), codebook=st.integers(2, 5), items=st.integers(1, 30), requests=st.integers(1, 3),
       k=st.integers(1, 8), seed=st.integers(0, 10_000), data=st.data())
def test_step_verified_search_with_room_for_every_prefix_is_exact(levels, codebook, items, requests, k, seed, data):
    g = torch.Generator().manual_seed(seed)
    codes = with_collision_code(torch.randint(codebook, (items, levels), generator=g))
    radices = (codebook,) * levels + (int(codes[:, -1].max()) + 1,)
    assert len(torch.unique(mixed_radix_encode(codes, radices))) == items
    index = SemanticIdIndex(torch.cat([torch.zeros(1, levels + 1, dtype=torch.long), codes]), radices)
    exclude = [set(data.draw(st.lists(st.integers(1, items), max_size=3))) for _ in range(requests)]
    first, step, logp = _path_model(radices, requests, seed)
    result = beam_search(first, step, index, width=items, k=k, verify="step", exclude=exclude)
    want = _exhaustive(codes, radices, requests, logp, exclude)
    for r in range(requests):
        got = [(i, s) for i, s in zip(result.items[r].tolist(), result.scores[r].tolist()) if i > 0]
        best = sorted(want[r].values(), reverse=True)[:k]
        assert len(got) == len(best) and len({i for i, _ in got}) == len(got)
        assert torch.allclose(torch.tensor([s for _, s in got]), torch.tensor(best), atol=1e-5)  # the top k
        assert all(abs(want[r][i] - s) < 1e-5 for i, s in got)  # each its own item's score (KeyError: excluded)
        assert (result.items[r, len(got):] == 0).all() and torch.isinf(result.scores[r, len(got):]).all()
