"""Zenith and Zenith++ (MODELS.md §4; Zhang et al. 2026, TikTok Live): a feature-interaction ranker over
a few wide "Prime Tokens" with token-wise parameters.

This is a reconstruction: only the paper's abstract is public, so what follows implements the
secondary description in MODELS.md and names every choice it had to make (marked "choice").

Pipeline, per (request, candidate) row (rows never interact, so candidates are independent):
1. Prime tokenisation (`PrimeTokenizer`) over the shared features of `models.features`: each ID feature
   (user, item, author) is its own token, its whole embedding projected to width D (never split);
   every other group (history summary, item stats, user stats, context, affinity) is one token made by
   a group-specific MLP. T = 8 tokens of width D; choice: a LayerNorm over each token at the end, so
   all tokens enter the first layer on the same scale.
2. `num_layers` Zenith layers, each Token Fusion then Token Boost, each with residual + normalisation
   (post-norm, choice):
   - "zenith":   retokenised fusion O = (X Xᵀ/D)(X W_R) + token-wise SwiGLU;
   - "zenith++": token-wise multi-head self-attention + token-wise sparse MoE (top-k routing,
                 load-balancing loss in `model.aux_loss`, added by `loss`);
   - "shared":   ordinary shared-weight MHSA + shared SwiGLU, the baseline of the paper's claim that
                 token-wise weights keep tokens dissimilar (`token_similarity` measures it).
3. Head (choice: flatten, not pool, since pooling would average away the per-token differences the
   token-wise weights create): one shared MLP on the flattened final tokens, one logit per task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from models.features import ID_FEATURES, CandidateFeatures, FeatureEmbedder, RankingInputSpec, ranking_bce
from models.heads import prior_logits
from models.inputs import RankingInputs
from models.zenith_layers import RetokenisedFusion, TokenwiseAttention, TokenwiseMoE, TokenwiseSwiGLU

FUSIONS = ("retokenised", "tokenwise_mhsa", "shared_mhsa")
BOOSTS = ("tokenwise_swiglu", "tokenwise_moe", "shared_swiglu")


@dataclass
class ZenithConfig:
    """Configuration of `Zenith`; the presets `zenith`, `zenith_pp` and `shared` pick fusion and boost.

    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20)
    >>> ZenithConfig.zenith_pp(spec, num_tasks=2).boost
    'tokenwise_moe'
    """

    features: RankingInputSpec
    num_tasks: int = 1
    dim: int = 64  # D, the token width
    num_layers: int = 2
    fusion: str = "retokenised"  # one of FUSIONS
    boost: str = "tokenwise_swiglu"  # one of BOOSTS
    ffn_mult: float = 2.0  # hidden width of SwiGLU / experts / fusion MLP = ffn_mult * D
    num_heads: int = 4  # for the attention fusions
    fused_tokens: int | None = None  # T' of the first retokenised fusion (None: T' = T, i.e. k = D)
    num_experts: int = 4
    top_k: int = 2
    aux_loss_weight: float = 0.01  # weight of the MoE load-balancing loss inside `loss`
    head_dims: tuple[int, ...] = (128,)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.boost not in BOOSTS:
            raise ValueError(f"boost must be one of {BOOSTS}, got {self.boost!r}")

    @classmethod
    def zenith(cls, features: RankingInputSpec, **kwargs) -> ZenithConfig:
        return cls(features, **{"fusion": "retokenised", "boost": "tokenwise_swiglu", **kwargs})

    @classmethod
    def zenith_pp(cls, features: RankingInputSpec, **kwargs) -> ZenithConfig:
        return cls(features, **{"fusion": "tokenwise_mhsa", "boost": "tokenwise_moe", **kwargs})

    @classmethod
    def shared(cls, features: RankingInputSpec, **kwargs) -> ZenithConfig:
        return cls(features, **{"fusion": "shared_mhsa", "boost": "shared_swiglu", **kwargs})

    @property
    def hidden(self) -> int:
        return max(1, int(self.ffn_mult * self.dim))


class PrimeTokenizer(nn.Module):
    """Feature groups -> Prime Tokens [N, T, D]: one token per ID feature (a linear projection of its
    whole embedding) and one per remaining group (a group-specific two-layer MLP).

    >>> from models.inputs import random_ranking_inputs
    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    >>> feats = FeatureEmbedder(spec)(random_ranking_inputs())
    >>> PrimeTokenizer(spec, dim=16)(feats).shape[1:]
    torch.Size([8, 16])
    """

    def __init__(self, spec: RankingInputSpec, dim: int):
        super().__init__()
        self.names = list(spec.group_dims())
        proj: dict[str, nn.Module] = {}
        for name, width in spec.group_dims().items():
            if name in ID_FEATURES:
                proj[name] = nn.Linear(width, dim)
            else:
                proj[name] = nn.Sequential(nn.Linear(width, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.proj = nn.ModuleDict(proj)
        self.norm = nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return len(self.names)

    def forward(self, feats: CandidateFeatures) -> torch.Tensor:
        tokens = torch.stack([self.proj[name](feats.groups[name]) for name in self.names], dim=1)
        return self.norm(tokens)


class ZenithLayer(nn.Module):
    """Token Fusion then Token Boost (each does its own residual + norm): [N, T, D] -> [N, T_out, D].

    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20)
    >>> layer = ZenithLayer(ZenithConfig.zenith(spec, dim=16), num_tokens=8)
    >>> layer(torch.randn(2, 8, 16)).shape
    torch.Size([2, 8, 16])
    """

    def __init__(self, config: ZenithConfig, num_tokens: int, out_tokens: int | None = None):
        super().__init__()
        c, t = config, num_tokens
        self.out_tokens = out_tokens or t
        if c.fusion == "retokenised":
            self.fusion: nn.Module = RetokenisedFusion(t, self.out_tokens, c.dim, c.hidden)
        elif out_tokens not in (None, t):
            raise ValueError("only the retokenised fusion can change the number of tokens")
        else:
            self.fusion = TokenwiseAttention(t, c.dim, c.num_heads, shared=c.fusion == "shared_mhsa")
        t = self.out_tokens
        if c.boost == "tokenwise_moe":
            self.boost: nn.Module = TokenwiseMoE(t, c.dim, c.hidden, c.num_experts, c.top_k)
        else:
            self.boost = TokenwiseSwiGLU(t, c.dim, c.hidden, shared=c.boost == "shared_swiglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.boost(self.fusion(x))


class Zenith(nn.Module):
    """Zenith / Zenith++ ranker: RankingInputs -> logits [B, C, num_tasks], one row per candidate.

    >>> from models.inputs import random_ranking_inputs
    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    >>> model = Zenith(ZenithConfig.zenith_pp(spec, num_tasks=2, dim=16, head_dims=(32,)))
    >>> inputs = random_ranking_inputs()
    >>> model(inputs).shape
    torch.Size([4, 8, 2])
    >>> loss = model.loss(inputs, torch.zeros(4, 8, 2))  # BCE + aux_loss_weight * model.aux_loss
    >>> loss.backward()
    """

    def __init__(self, config: ZenithConfig):
        super().__init__()
        self.config = config
        self.embedder = FeatureEmbedder(config.features)
        self.tokenizer = PrimeTokenizer(config.features, config.dim)
        t = self.tokenizer.num_tokens
        layers = []
        for i in range(config.num_layers):
            out = config.fused_tokens if i == 0 and config.fused_tokens is not None else t
            layers.append(ZenithLayer(config, t, out))
            t = out
        self.layers = nn.ModuleList(layers)
        self.num_final_tokens = t
        head: list[nn.Module] = []
        width = t * config.dim
        for hidden in config.head_dims:
            head += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.head = nn.Sequential(*head, nn.Linear(width, config.num_tasks))
        self.aux_loss = torch.zeros(())

    def encode(self, inputs: RankingInputs) -> tuple[CandidateFeatures, list[torch.Tensor]]:
        """The real candidates' features and the tokens after each layer ([N, T_l, D] each).
        Also sets `self.aux_loss` (sum of the MoE balance losses; 0 without MoE)."""
        feats = self.embedder(inputs)
        x = self.tokenizer(feats)
        outs = []
        aux = x.new_zeros(())
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
            if isinstance(layer.boost, TokenwiseMoE):
                aux = aux + layer.boost.aux_loss
        self.aux_loss = aux
        return feats, outs

    def forward(self, inputs: RankingInputs) -> torch.Tensor:
        feats, outs = self.encode(inputs)
        return feats.scatter(self.head(outs[-1].flatten(1)))

    @torch.no_grad()
    def init_task_bias(self, rates: torch.Tensor) -> None:
        """Start each task's output at its base rate's log-odds (models.heads.prior_logits)."""
        self.head[-1].bias.copy_(prior_logits(rates, self.config.num_tasks))

    def loss(
        self, inputs: RankingInputs, labels: torch.Tensor, task_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed (or weighted) per-task BCE over real candidates + aux_loss_weight * MoE balance loss."""
        bce = ranking_bce(self(inputs), labels, inputs.candidate_mask(), task_weights)
        return bce + self.config.aux_loss_weight * self.aux_loss


@torch.no_grad()
def token_similarity(model: Zenith, inputs: RankingInputs) -> list[float]:
    """Mean pairwise cosine similarity of the tokens after each layer, self pairs excluded, averaged over
    the real candidates: one value in [-1, 1] per layer (the paper reports ~0.5-0.68 for shared-weight
    attention vs ~0.06-0.47 for Zenith).

    >>> from models.inputs import random_ranking_inputs
    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    >>> model = Zenith(ZenithConfig.shared(spec, dim=16, num_layers=3))
    >>> len(token_similarity(model, random_ranking_inputs()))
    3
    """
    _, outs = model.encode(inputs)
    sims = []
    for x in outs:
        t = x.shape[1]
        u = nn.functional.normalize(x.float(), dim=-1)
        gram = u @ u.transpose(1, 2)  # [N, T, T]
        off = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / (t * (t - 1))
        sims.append(float(off.mean().clamp(-1.0, 1.0)) if t > 1 else float("nan"))  # 1 token: no pairs
    return sims


def with_variant(config: ZenithConfig, variant: str) -> ZenithConfig:
    """The same config with the fusion / boost of a named variant ("zenith", "zenith++", "shared")."""
    presets = {
        "zenith": ("retokenised", "tokenwise_swiglu"),
        "zenith++": ("tokenwise_mhsa", "tokenwise_moe"),
        "shared": ("shared_mhsa", "shared_swiglu"),
    }
    fusion, boost = presets[variant]
    # Only the retokenised fusion can change the token count, so the other variants keep T tokens.
    fused = config.fused_tokens if variant == "zenith" else None
    return replace(config, fusion=fusion, boost=boost, fused_tokens=fused)
