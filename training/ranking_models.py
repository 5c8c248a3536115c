"""The ranking models a training config can name, built from the sample stream's feature metadata.

dlrm, zenith and zenith++ read the declared feature groups (models/features.py: ids, history mean,
windowed stats of user, candidate and author, context); hstu and genrank read the history as a
sequence plus the candidate's stats. All of them see the same rows in the same order.

>>> from config.schema import TrainingConfig
>>> from training.ranking_batch import RankingFeatures
>>> feats = RankingFeatures(kind="ratings", tasks=("like", "love"), stat_names=("n", "ctr"), num_users=20,
...                         num_items=50, num_authors=0, max_hist_len=16)
>>> model, config = build_ranker("zenith++", feats, TrainingConfig(d_model=16, embed_dim=8, num_heads=2))
>>> type(model).__name__, config.boost
('Zenith', 'tokenwise_moe')
"""

from __future__ import annotations

from torch import nn

from config.schema import TrainingConfig
from models.dlrm import DLRM, DLRMConfig
from models.features import RankingInputSpec
from models.genrank import GenRank, HSTURanking, RankerConfig
from models.position import PositionDebiasedRanker
from models.zenith import Zenith, ZenithConfig
from training.ranking_batch import RankingFeatures

MODELS = ("dlrm", "hstu", "genrank", "zenith", "zenith++", "zenith-shared")
ZENITH_PRESETS = {"zenith": ZenithConfig.zenith, "zenith++": ZenithConfig.zenith_pp,
                  "zenith-shared": ZenithConfig.shared}


def build_ranker(kind: str, feats: RankingFeatures, t: TrainingConfig):
    """(model, its config dataclass) for `kind`; the config is what the artifact stores."""
    num_tasks = len(feats.tasks)
    if kind == "dlrm" or kind in ZENITH_PRESETS:
        spec = RankingInputSpec(num_users=feats.num_users, num_items=feats.num_items,
                           num_authors=max(feats.num_authors, 1), num_actions=feats.num_actions,
                           item_dense_dim=feats.item_dense_dim, user_dense_dim=feats.user_dense_dim,
                           embed_dim=t.embed_dim)
        if kind == "dlrm":
            config = DLRMConfig(spec, num_tasks=num_tasks)
            return DLRM(config), config
        config = ZENITH_PRESETS[kind](spec, num_tasks=num_tasks, dim=t.d_model, num_layers=t.num_blocks,
                                      num_heads=t.num_heads)
        return Zenith(config), config
    if kind not in ("hstu", "genrank"):
        raise ValueError(f"training.model must be one of {MODELS}, got {kind!r}")
    per_head = t.d_model // t.num_heads
    config = RankerConfig(num_items=feats.num_items, num_actions=feats.num_actions, num_tasks=num_tasks,
                          num_authors=feats.num_authors, cand_dense_dim=feats.item_dense_dim,
                          max_hist_len=feats.max_hist_len, d_model=t.d_model, num_blocks=t.num_blocks,
                          num_heads=t.num_heads, d_qk=per_head, d_v=per_head, dropout=t.dropout)
    return (GenRank(config) if kind == "genrank" else HSTURanking(config)), config


def build_trainable(kind: str, feats: RankingFeatures, t: TrainingConfig):
    """(what training fits, the ranker's config): the ranker, with the display-slot offsets when
    `position_bias_slots` asks for them."""
    model, config = build_ranker(kind, feats, t)
    if not t.position_bias_slots:
        return model, config
    if feats.kind != "livestream":
        raise ValueError(f"training.position_bias_slots={t.position_bias_slots} needs samples in display order "
                         f"(livestream); these are {feats.kind!r}: set training.position_bias_slots=0")
    return PositionDebiasedRanker(model, t.position_bias_slots, len(feats.tasks)), config


def ranker_of(model: nn.Module) -> nn.Module:
    """The ranker inside what `build_trainable` returned (what the artifact stores)."""
    return model.ranker if isinstance(model, PositionDebiasedRanker) else model


def extra_loss(model: nn.Module):
    """Loss terms a model adds beyond the task BCE (Zenith++'s MoE balance loss of the last forward)."""
    model = ranker_of(model)
    if isinstance(model, Zenith):
        return model.config.aux_loss_weight * model.aux_loss
    return 0.0
