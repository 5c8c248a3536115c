"""Build an item -> semantic-ID table (MODELS.md §6) from item embeddings: the item table of a trained
sequential model and/or item attributes, tokenised by RQ-KMeans (default) or RQ-VAE, plus the
collision code. Reports codebook utilisation and the collision rate.

>>> import torch
>>> emb = torch.randn(101, 8, generator=torch.Generator().manual_seed(0))   # row 0 = padding
>>> sid = build_semantic_ids(emb, codebook_sizes=(8, 8), iters=5)
>>> sid.table.shape[0], sid.radices[:2], sid.stats["unique"]
(101, (8, 8), True)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.semantic_ids import RQVAE, code_stats, mixed_radix_encode, rq_kmeans, with_collision_code

log = logging.getLogger(__name__)

METHODS = ("rq-kmeans", "rq-vae")


@dataclass
class SemanticIds:
    table: torch.Tensor  # [num_items + 1, L + 1] long; row 0 = padding (zeros)
    radices: tuple[int, ...]  # codebook sizes, the last one = collision-code size
    stats: dict = field(default_factory=dict)
    # RQ-KMeans centroids per level ([T_l, d] in the tokenised embedding's space), None for RQ-VAE
    codebooks: list[torch.Tensor] | None = None


def attribute_embeddings(attributes: list[list[int]], dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Dense item vectors [num_items + 1, dim] from attribute-id lists: a TF-IDF-weighted multi-hot
    matrix reduced by a randomised PCA, rows L2-normalised (row 0 = padding, zeros)."""
    n = len(attributes)
    rows = torch.tensor([i for i, a in enumerate(attributes) for _ in a], dtype=torch.long)
    cols_raw = torch.tensor([c for a in attributes for c in a], dtype=torch.long)
    if len(cols_raw) == 0:
        return torch.zeros(n, dim)
    vocab, cols = torch.unique(cols_raw, return_inverse=True)
    idf = torch.log(n / torch.bincount(cols, minlength=len(vocab)).float())
    m = torch.zeros(n, len(vocab))
    m[rows, cols] = idf[cols]
    torch.manual_seed(seed)
    u, s, _ = torch.pca_lowrank(m, q=min(dim, len(vocab), n), center=True)
    out = F.normalize(u * s, dim=1)
    out[0] = 0
    return F.pad(out, (0, dim - out.shape[1]))


def principal_components(table: torch.Tensor, dim: int) -> torch.Tensor:
    """An item table [num_items + 1, d] reduced to its top `dim` principal directions (exact SVD of the centred
    item rows; row 0, padding, stays zero): how a dense table wider than the generative retriever is brought to
    its width before tokenising (training.retrieval.pipeline).

    >>> t = torch.cat([torch.zeros(1, 4), torch.randn(20, 2) @ torch.randn(2, 4)])   # rank 2
    >>> r = principal_components(t, 2)
    >>> r.shape, bool(r[0].eq(0).all())
    (torch.Size([21, 2]), True)
    >>> bool(torch.allclose(torch.cdist(r[1:], r[1:]), torch.cdist(t[1:], t[1:]), atol=1e-4))   # nothing lost
    True
    """
    x = table[1:].detach().float()
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    out = torch.zeros(len(table), dim)
    out[1:] = centred @ v[:dim].T
    return out


def train_rqvae(x: torch.Tensor, codebook_sizes, latent: int = 32, epochs: int = 200, lr: float = 1e-3,
                batch_size: int = 1024, seed: int = 0) -> torch.Tensor:
    """Fit TIGER's RQ-VAE on x [n, d] (codebooks initialised by RQ-KMeans on the first latents); codes [n, L]."""
    torch.manual_seed(seed)
    vae = RQVAE(x.shape[1], latent=latent, codebook_sizes=tuple(codebook_sizes), hidden=(256, 128))
    with torch.no_grad():
        _, books = rq_kmeans(vae.encoder(x), codebook_sizes, iters=10, seed=seed)
        for param, book in zip(vae.codebooks, books):
            param.copy_(book)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss, _ = vae(x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return vae(x)[1]


def build_semantic_ids(embeddings: torch.Tensor, method: str = "rq-kmeans", codebook_sizes=(256, 256, 256),
                       balanced: bool = False, iters: int = 20, seed: int = 0, vae_epochs: int = 200
                       ) -> SemanticIds:
    """Tokenise item embeddings [num_items + 1, d] (row 0 = padding) into a unique-per-item table."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    x = embeddings[1:].detach().float().cpu()
    books = None
    if method == "rq-kmeans":
        codes, books = rq_kmeans(x, codebook_sizes, iters=iters, balanced=balanced, seed=seed)
    else:
        codes = train_rqvae(x, codebook_sizes, epochs=vae_epochs, seed=seed)
    stats = code_stats(codes, codebook_sizes)
    full = with_collision_code(codes)
    radices = (*(int(t) for t in codebook_sizes), int(full[:, -1].max()) + 1)
    table = torch.cat([torch.zeros(1, full.shape[1], dtype=torch.long), full])
    stats.update(method=method, balanced=balanced, levels=len(radices), radices=list(radices),
                 collision_code_size=radices[-1],
                 unique=bool(len(torch.unique(mixed_radix_encode(full, radices))) == len(full)),
                 seconds=round(time.perf_counter() - t0, 2))
    log.info("semantic IDs (%s): %s", method, stats)
    return SemanticIds(table=table, radices=radices, stats=stats, codebooks=books)


def item_embeddings(model_table: torch.Tensor | None, attributes: torch.Tensor | None,
                    attribute_weight: float = 0.5) -> torch.Tensor:
    """The embedding that is tokenised: the model's L2-normalised item table, the attribute vectors, or
    both concatenated (each normalised, attributes scaled by `attribute_weight`)."""
    parts = []
    if model_table is not None:
        parts.append(F.normalize(model_table.detach().float(), dim=1))
    if attributes is not None:
        parts.append(attribute_weight * F.normalize(attributes.float(), dim=1))
    if not parts:
        raise ValueError("need a model item table and/or item attributes")
    return torch.cat(parts, dim=1)
