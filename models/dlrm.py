"""DLRM baseline (MODELS.md §5): embeddings + DCN-V2 cross network + deep MLP, multi-task output.

Every ranking result is reported against this model, so it consumes exactly the features Zenith does
(`models.features.FeatureEmbedder`): the ID embeddings, the pooled history, the windowed stats, the
context and the affinity features of each (request, candidate) pair.

DCN-V2 (Wang et al., 2021), "stacked" structure: x0 = concat(features); x_{l+1} = x0 * (W_l x_l + b_l) +
x_l; then a ReLU MLP and one linear output per task. W_l is full rank by default or low rank
(W_l = U_l V_l^T, rank r) when `cross_rank` is set, the paper's cheaper variant.
Choice: x0 is layer-normalised first, because the raw groups live on very different scales (embeddings
~0.1, log1p counts ~10) and the cross product x0 * (...) amplifies that mismatch layer after layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.features import FeatureEmbedder, RankingInputSpec, ranking_bce
from models.heads import prior_logits
from models.inputs import RankingInputs


@dataclass
class DLRMConfig:
    """Configuration of `DLRM`.

    >>> cfg = DLRMConfig(RankingInputSpec(num_users=50, num_items=100, num_authors=20), num_tasks=2)
    >>> cfg.cross_layers
    3
    """

    features: RankingInputSpec
    num_tasks: int = 1
    cross_layers: int = 3
    cross_rank: int | None = None  # None: full-rank W_l; r: W_l = U_l V_l^T with rank r
    mlp_dims: tuple[int, ...] = (256, 128)


class CrossLayer(nn.Module):
    """One DCN-V2 cross layer: x0 * (W x + b) + x, with W full rank or U V^T of rank `rank`.

    >>> layer = CrossLayer(10, rank=4)
    >>> x0 = torch.randn(3, 10)
    >>> layer(x0, x0).shape
    torch.Size([3, 10])
    """

    def __init__(self, dim: int, rank: int | None = None):
        super().__init__()
        if rank is None:
            self.proj = nn.Linear(dim, dim)
        else:
            self.proj = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(x) + x


class DLRM(nn.Module):
    """DCN-V2 ranker: RankingInputs -> logits [B, C, num_tasks], one row per candidate.

    >>> from models.inputs import random_ranking_inputs
    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    >>> model = DLRM(DLRMConfig(spec, num_tasks=2, cross_rank=4, mlp_dims=(32,)))
    >>> inputs = random_ranking_inputs()
    >>> model(inputs).shape
    torch.Size([4, 8, 2])
    >>> labels = torch.zeros(4, 8, 2)
    >>> model.loss(inputs, labels).dim()
    0
    """

    def __init__(self, config: DLRMConfig):
        super().__init__()
        self.config = config
        self.embedder = FeatureEmbedder(config.features)
        dim = config.features.total_dim
        self.input_norm = nn.LayerNorm(dim)
        self.cross = nn.ModuleList(CrossLayer(dim, config.cross_rank) for _ in range(config.cross_layers))
        layers: list[nn.Module] = []
        width = dim
        for hidden in config.mlp_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.deep = nn.Sequential(*layers)
        self.out = nn.Linear(width, config.num_tasks)

    def forward(self, inputs: RankingInputs) -> torch.Tensor:
        feats = self.embedder(inputs)
        x0 = self.input_norm(feats.concat())
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return feats.scatter(self.out(self.deep(x)))

    @torch.no_grad()
    def init_task_bias(self, rates: torch.Tensor) -> None:
        """Start each task's output at its base rate's log-odds (models.heads.prior_logits)."""
        self.out.bias.copy_(prior_logits(rates, self.config.num_tasks))

    def loss(
        self, inputs: RankingInputs, labels: torch.Tensor, task_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed (or `task_weights`-weighted) per-task BCE over the real candidates."""
        return ranking_bce(self(inputs), labels, inputs.candidate_mask(), task_weights)
