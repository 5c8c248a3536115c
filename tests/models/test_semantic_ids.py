"""Semantic IDs: mixed radix, hash sets, prefix sets, uniqueness, (balanced) RQ-KMeans, RQ-VAE."""

import itertools

import pytest
import torch

from models.semantic_ids import (
    RQVAE,
    IntHashSet,
    SemanticIdIndex,
    code_stats,
    kmeans,
    mixed_radix_decode,
    mixed_radix_encode,
    prefix_values,
    rq_kmeans,
    with_collision_code,
)


@pytest.mark.parametrize("radices", [(256, 256, 256, 7), (3, 5, 2), (1000,)])
def test_mixed_radix_round_trip(radices):
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(t, (500,), generator=g) for t in radices], dim=1)
    values = mixed_radix_encode(codes, radices)
    assert torch.equal(mixed_radix_decode(values, radices), codes)
    # distinct tuples <-> distinct integers; the integers stay below Π T
    assert len(torch.unique(values)) == len(torch.unique(codes, dim=0))
    assert int(values.max()) < torch.tensor(radices).prod()


def test_prefix_values_are_the_encoding_of_the_first_codes():
    radices = (4, 3, 5)
    codes = torch.tensor(list(itertools.product(range(4), range(3), range(5))))
    values = mixed_radix_encode(codes, radices)
    for level in range(1, 4):
        assert torch.equal(prefix_values(values, radices, level), mixed_radix_encode(codes[:, :level], radices))


def test_hash_set_matches_a_python_set():
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 10**9, (3000,), generator=g)
    keys = torch.cat([keys, keys[:100], torch.arange(64) * 1024])  # duplicates and hash-hostile keys
    payload = torch.arange(len(keys))
    s = IntHashSet(keys, payload)
    queries = torch.cat([keys, torch.randint(0, 10**9, (3000,), generator=g)])
    truth = set(keys.tolist())
    assert s.contains(queries).tolist() == [q in truth for q in queries.tolist()]
    first = {}
    for k, p in zip(keys.tolist(), payload.tolist()):
        first.setdefault(k, p)
    assert s.get(queries).tolist() == [first.get(q, -1) for q in queries.tolist()]
    assert len(s) == len(truth)


def test_index_prefix_sets_and_items():
    g = torch.Generator().manual_seed(2)
    radices = (6, 5, 4)
    codes = torch.unique(torch.stack([torch.randint(t, (80,), generator=g) for t in radices], 1), dim=0)
    table = torch.cat([torch.zeros(1, 3, dtype=torch.long), codes])
    index = SemanticIdIndex(table, radices)
    all_tuples = torch.tensor(list(itertools.product(*(range(t) for t in radices))))
    for level in range(1, 4):  # the prefix table holds exactly the valid prefixes
        valid = {tuple(r) for r in codes[:, :level].tolist()}
        got = index.prefix_rows(all_tuples[:, :level]) >= 0
        assert got.tolist() == [tuple(r) in valid for r in all_tuples[:, :level].tolist()]
    assert index.prefix_rows(all_tuples).tolist() == index.item_of(mixed_radix_encode(all_tuples, radices)).tolist()
    items = index.item_of(mixed_radix_encode(all_tuples, radices))
    expected = {tuple(r): i + 1 for i, r in enumerate(codes.tolist())}
    assert items.tolist() == [expected.get(tuple(r), -1) for r in all_tuples.tolist()]
    with pytest.raises(ValueError, match="unique"):
        SemanticIdIndex(torch.cat([table, table[1:2]]), radices)


def test_collision_code_makes_every_tuple_unique():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(3, (200, 2), generator=g)  # 9 tuples for 200 items: many collisions
    full = with_collision_code(codes)
    assert torch.equal(full[:, :2], codes)
    assert len(torch.unique(full, dim=0)) == 200
    _, counts = torch.unique(codes, dim=0, return_counts=True)
    assert int(full[:, 2].max()) + 1 == int(counts.max())  # codes 0..(group size - 1)
    stats = code_stats(codes, (3, 3))
    assert stats["collision_rate"] == 1.0 and stats["utilisation_l1"] == 1.0


def test_kmeans_recovers_separated_clusters_and_balances():
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centres])
    _, assign = kmeans(x, 3, generator=g)
    assert len(torch.unique(assign[:30])) == len(torch.unique(assign[30:60])) == 1
    assert len(torch.unique(assign)) == 3
    skewed = torch.cat([torch.zeros(50, 2), torch.ones(10, 2)]) + 0.01 * torch.randn(60, 2, generator=g)
    _, balanced = kmeans(skewed, 4, balanced=True, generator=g)
    assert int(torch.bincount(balanced, minlength=4).max()) <= 15


def test_rq_kmeans_residuals_shrink():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))
    codes, books = rq_kmeans(x, (8, 8, 8), iters=10)
    assert codes.shape == (300, 3) and all(int(c.max()) < 8 for c in codes.T)
    recon = torch.zeros_like(x)
    errors = []
    for level, book in enumerate(books):
        recon = recon + book[codes[:, level]]
        errors.append(float((x - recon).pow(2).sum()))
    assert errors[0] > errors[1] > errors[2]


def test_rqvae_gradients_reach_encoder_decoder_and_codebooks():
    torch.manual_seed(0)
    vae = RQVAE(12, latent=4, codebook_sizes=(4, 4), hidden=(16,))
    loss, codes = vae(torch.randn(64, 12))
    loss.backward()
    assert codes.shape == (64, 2)
    for part in (vae.encoder, vae.decoder, vae.codebooks):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
