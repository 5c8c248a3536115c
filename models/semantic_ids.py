"""Semantic IDs (MODELS.md §6): RQ-KMeans (default) or RQ-VAE codes, a collision code, mixed-radix
integers and the hash sets that verify generated IDs without calling a model.

An item's semantic ID is a tuple (t_1, ..., t_L) with t_l < T_l. As one integer (mixed radix, first
code least significant) V = Σ_l t_l · Π_{j<l} T_j, so the prefix of the first l codes is simply
V mod Π_{j<=l} T_j: prefix sets and the item set come from one tensor of item integers.

>>> import torch
>>> codes = torch.tensor([[1, 2, 0], [3, 0, 1]]); radices = (4, 3, 2)
>>> v = mixed_radix_encode(codes, radices); v.tolist()
[9, 15]
>>> mixed_radix_decode(v, radices).tolist() == codes.tolist(), prefix_values(v, radices, 1).tolist()
(True, [1, 3])
>>> s = IntHashSet(v, payload=torch.tensor([7, 8]))
>>> s.contains(torch.tensor([15, 9, 10])).tolist(), s.get(torch.tensor([15, 10])).tolist()
([True, True, False], [8, -1])
>>> with_collision_code(torch.tensor([[1, 2], [1, 2], [0, 0]])).tolist()
[[1, 2, 0], [1, 2, 1], [0, 0, 0]]
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (Fibonacci hashing)


def radix_products(radices: tuple[int, ...] | list[int]) -> list[int]:
    """[1, T_1, T_1·T_2, ...]: the weight of each level (L + 1 entries, the last is the number of tuples)."""
    out = [1]
    for t in radices:
        out.append(out[-1] * int(t))
    return out


def mixed_radix_encode(codes: torch.Tensor, radices) -> torch.Tensor:
    """Codes [..., l] (the first l levels) -> int64 [...] = Σ t_j · Π_{i<j} T_i."""
    w = torch.tensor(radix_products(radices)[: codes.shape[-1]], dtype=torch.long, device=codes.device)
    return (codes.long() * w).sum(-1)


def mixed_radix_decode(values: torch.Tensor, radices) -> torch.Tensor:
    """Inverse of `mixed_radix_encode` for full tuples: int64 [...] -> codes [..., L]."""
    w = torch.tensor(radix_products(radices)[:-1], dtype=torch.long, device=values.device)
    t = torch.tensor(list(radices), dtype=torch.long, device=values.device)
    return (values.long()[..., None] // w) % t


def prefix_values(values: torch.Tensor, radices, level: int) -> torch.Tensor:
    """The integer of the first `level` codes of full-tuple integers `values`."""
    return values % radix_products(radices)[level]


class IntHashSet:
    """Open-addressing hash set of non-negative int64 keys (linear probing, load <= 1/4) with an
    optional int64 payload per key; lookups are vectorised: `max_probes` gathers per query.

    Choice: a real hash table in torch rather than a Python set, so that checking a whole beam
    expansion (B x W x T candidates) is a handful of tensor ops instead of a Python loop.
    """

    def __init__(self, keys: torch.Tensor, payload: torch.Tensor | None = None):
        keys = keys.long().flatten()
        if payload is None:
            payload = torch.zeros_like(keys)
        keys, first = _unique_first(keys)
        payload = payload.long().flatten()[first]
        self.bits = max(3, math.ceil(math.log2(max(4 * len(keys), 1))))
        size = 1 << self.bits
        self.keys = torch.full((size,), -1, dtype=torch.long, device=keys.device)
        self.payload = torch.full((size,), -1, dtype=torch.long, device=keys.device)
        pending, probe = torch.arange(len(keys), device=keys.device), 0
        while len(pending):  # each round places every pending key whose slot at this probe is free
            slot = (self._hash(keys[pending]) + probe) & (size - 1)
            free = self.keys[slot] == -1
            self.keys[slot[free]] = keys[pending[free]]  # colliding writers: one of them wins
            won = free & (self.keys[slot] == keys[pending])
            self.payload[slot[won]] = payload[pending[won]]
            pending, probe = pending[~won], probe + 1
        self.max_probes = max(probe, 1)
        self.size = len(keys)

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        return ((x * _GOLDEN) >> (64 - self.bits)) & ((1 << self.bits) - 1)

    def get(self, queries: torch.Tensor) -> torch.Tensor:
        """Payload of each query key, -1 where the key is absent."""
        q = queries.long()
        h = self._hash(q)
        out = torch.full_like(q, -1)
        for p in range(self.max_probes):
            slot = (h + p) & (len(self.keys) - 1)
            out = torch.where(self.keys[slot] == q, self.payload[slot], out)
        return out

    def contains(self, queries: torch.Tensor) -> torch.Tensor:
        q = queries.long()
        h = self._hash(q)
        hit = torch.zeros_like(q, dtype=torch.bool)
        for p in range(self.max_probes):
            hit |= self.keys[(h + p) & (len(self.keys) - 1)] == q
        return hit

    def __len__(self) -> int:
        return self.size


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of x and the index of each one's first occurrence."""
    uniq, inv = torch.unique(x, return_inverse=True)
    first = torch.full((len(uniq),), len(x), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inv, torch.arange(len(x), device=x.device), reduce="amin")
    return uniq, first


class SemanticIdIndex:
    """Verification structures of one semantic-ID table. `table` is [num_items + 1, L] (row i = dense
    item i; row 0, padding, is ignored); every row must be a distinct tuple (use `with_collision_code`).

    - `items`: hash set item integer -> dense item id (verification at the end, `item_of`);
    - `children[l]`: [prefixes of l codes + 1, T_l] int64, the valid prefixes as a table: entry [r, t] is the
      row of prefix r extended by code t among the prefixes of l + 1 codes (at the last level: the dense item
      id), -1 where that extension is no valid prefix. Row 0 of `children[0]` is the empty prefix. The last
      row is all -1: an invalid prefix (row -1) indexes it, so extending a beam needs no check of its own.

    Choice (MODELS.md §7 says "a hash set of valid prefixes" per step): verifying every step with hash sets
    probes each (beam, code) expansion, W x T lookups per level; the table gives each beam its row once and
    checks all its T extensions with one gather, and the beam carries its row to the next level. It holds
    the same set (a prefix is valid iff it has a row), at most items x T entries per level.

    >>> idx = SemanticIdIndex(torch.tensor([[0, 0], [1, 0], [1, 1]]), radices=(2, 2))
    >>> idx.item_of(torch.tensor([1, 3, 2])).tolist(), idx.children[0].tolist(), idx.children[1].tolist()
    ([1, 2, -1], [[-1, 0], [-1, -1]], [[1, 2], [-1, -1]])
    >>> idx.prefix_rows(torch.tensor([[1, 1], [0, 1]])).tolist()   # item 2; (0, 1) is no valid prefix
    [2, -1]
    """

    def __init__(self, table: torch.Tensor, radices):
        self.radices = tuple(int(t) for t in radices)
        values = mixed_radix_encode(table[1:], self.radices)
        if len(torch.unique(values)) != len(values):
            raise ValueError("semantic IDs are not unique per item: append a collision code")
        codes = table[1:].long()
        item_ids = torch.arange(1, len(table), device=table.device)
        self.items = IntHashSet(values, payload=item_ids)
        self.children = []
        row = torch.zeros_like(values)  # every item starts at the root, the empty prefix
        for level, t in enumerate(self.radices):
            if level + 1 < len(self.radices):
                _, child = torch.unique(prefix_values(values, self.radices, level + 1), return_inverse=True)
            else:
                child = item_ids
            table_l = torch.full((int(row.max()) + 2, t), -1, dtype=torch.long, device=values.device)
            table_l[row, codes[:, level]] = child
            self.children.append(table_l)
            row = child
        self.item_values = torch.cat([values.new_full((1,), -1), values])  # dense id -> integer

    def item_of(self, values: torch.Tensor) -> torch.Tensor:
        """Dense item id of each full-tuple integer, -1 for a tuple that names no item."""
        return self.items.get(values)

    def extend(self, level: int, rows: torch.Tensor) -> torch.Tensor:
        """[..., T_level]: the row (dense item id at the last level) of each prefix row extended by each code
        of `level`, -1 where invalid; rows of -1 (invalid prefixes) extend to -1 everywhere."""
        return self.children[level][rows]  # row -1 is the table's last row, all -1

    def prefix_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Row of each prefix [..., l] of l codes (its dense item id for full tuples), -1 if it is no valid prefix."""
        rows = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level in range(codes.shape[-1]):
            rows = self.extend(level, rows).gather(-1, codes[..., level:level + 1].long()).squeeze(-1)
        return rows


def with_collision_code(codes: torch.Tensor) -> torch.Tensor:
    """Append a last code 0, 1, 2, ... that numbers the items sharing a tuple, so every tuple is unique."""
    key = mixed_radix_encode(codes, [int(codes.max()) + 1] * codes.shape[1]) if codes.numel() else codes[:, 0]
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    start = torch.searchsorted(sorted_key, sorted_key)  # first index of each row's group
    rank = torch.empty_like(key)
    rank[order] = torch.arange(len(key), device=key.device) - start
    return torch.cat([codes, rank[:, None]], dim=1)


def code_stats(codes: torch.Tensor, radices) -> dict[str, float]:
    """Codebook utilisation per level (share of codes used) and collisions of the whole tuple.

    >>> code_stats(torch.tensor([[0, 1], [0, 1], [1, 0]]), (2, 4))
    {'utilisation_l1': 1.0, 'utilisation_l2': 0.5, 'collision_rate': 0.6667, 'max_items_per_tuple': 2}
    """
    out: dict[str, float] = {}
    for level, t in enumerate(radices):
        out[f"utilisation_l{level + 1}"] = round(len(torch.unique(codes[:, level])) / int(t), 4)
    _, counts = torch.unique(mixed_radix_encode(codes, radices), return_counts=True)
    out["collision_rate"] = round(float(counts[counts > 1].sum()) / max(len(codes), 1), 4)  # items sharing
    out["max_items_per_tuple"] = int(counts.max()) if len(counts) else 0
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 20, balanced: bool = False,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding; returns (centroids [k, d], assignment [n]).

    `balanced` caps every cluster at ceil(n / k) points (greedy by distance, see `_balanced_assign`).
    Empty clusters are re-seeded at the point farthest from its centroid.
    """
    n = x.shape[0]
    k = min(k, n)
    cent = x[torch.randint(n, (1,), generator=generator)]
    d2 = torch.cdist(x, cent).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++
        nxt = torch.multinomial(d2.clamp(min=1e-12) if d2.sum() > 0 else torch.ones_like(d2), 1, generator=generator)
        cent = torch.cat([cent, x[nxt]])
        d2 = torch.minimum(d2, (torch.cdist(x, x[nxt]).squeeze(1)) ** 2)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, cent)
        assign = _balanced_assign(dist, k) if balanced else dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1)[:, None].to(x.dtype)
        empty = counts == 0
        if empty.any():
            far = dist.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)[: int(empty.sum())]
            new[empty] = x[far]
        cent = new
    dist = torch.cdist(x, cent)
    return cent, (_balanced_assign(dist, k) if balanced else dist.argmin(1))


def _balanced_assign(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Assign points to clusters of at most ceil(n / k) points: in rounds, every unassigned point
    proposes to its nearest non-full cluster, which accepts its closest proposals up to capacity."""
    n = dist.shape[0]
    cap = torch.full((k,), math.ceil(n / k), dtype=torch.long)
    assign = torch.full((n,), -1, dtype=torch.long)
    while (assign < 0).any():
        free = torch.nonzero(assign < 0).squeeze(1)
        d = dist[free].masked_fill(cap[None, :] <= 0, float("inf"))
        best_d, prop = d.min(1)
        order = torch.argsort(best_d, stable=True)
        order = order[torch.argsort(prop[order], stable=True)]  # by cluster, then distance
        p = prop[order]
        rank = torch.arange(len(p)) - torch.searchsorted(p, p)
        take = rank < cap[p]
        assign[free[order[take]]] = p[take]
        cap -= torch.bincount(p[take], minlength=k)
    return assign


def rq_kmeans(x: torch.Tensor, codebook_sizes=(256, 256, 256), iters: int = 20, balanced: bool = False,
              seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Residual k-means: level 1 clusters x, level l clusters the residuals left by levels < l.

    Returns codes [n, L] and the L codebooks.

    >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    >>> codes, books = rq_kmeans(x, (4, 4), iters=5)
    >>> tuple(codes.shape), [tuple(b.shape) for b in books]
    ((64, 2), [(4, 4), (4, 4)])
    """
    g = torch.Generator().manual_seed(seed)
    residual, codes, books = x.float().clone(), [], []
    for k in codebook_sizes:
        cent, assign = kmeans(residual, k, iters=iters, balanced=balanced, generator=g)
        codes.append(assign)
        books.append(cent)
        residual = residual - cent[assign]
    return torch.stack(codes, dim=1), books


class RQVAE(nn.Module):
    """TIGER's RQ-VAE: MLP encoder to a `latent`-d vector, L residual codebooks, MLP decoder.
    loss = reconstruction (MSE) + Σ_l (codebook + beta · commitment); straight-through gradients.

    >>> vae = RQVAE(in_dim=16, latent=8, codebook_sizes=(4, 4), hidden=(32,))
    >>> loss, codes = vae(torch.randn(10, 16)); tuple(codes.shape), bool(loss > 0)
    ((10, 2), True)
    """

    def __init__(self, in_dim: int, latent: int = 32, codebook_sizes=(256, 256, 256), hidden=(512, 256, 128),
                 beta: float = 0.25):
        super().__init__()
        dims = [in_dim, *hidden, latent]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.codebooks = nn.ParameterList(nn.Parameter(torch.randn(k, latent) * 0.1) for k in codebook_sizes)
        self.beta = beta

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [n, latent] -> (quantized sum, codes [n, L], codebook + commitment loss)."""
        residual, quant, codes, loss = z, torch.zeros_like(z), [], z.new_zeros(())
        for book in self.codebooks:
            c = torch.cdist(residual.detach(), book).argmin(1)
            e = book[c]
            loss = loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            quant = quant + e
            residual = residual - e.detach()
            codes.append(c)
        return quant, torch.stack(codes, 1), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        quant, codes, q_loss = self.quantize(z)
        recon = self.decoder(z + (quant - z).detach())  # straight-through to the encoder
        return F.mse_loss(recon, x) + q_loss, codes


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
