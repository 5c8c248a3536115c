"""The ranking models a training config can name: the one place a name (`training.model`) is interpreted.

Each entry of `RANKERS` says how to build the model from the sample stream's features and the training
config, which classes the artifact must be able to rebuild (training/artifact.py registers them from here),
whether DDP must look for parameters a step leaves unused, and what loss the model adds beyond the task
BCE. A new ranker is a module under models/ plus one line here.

dlrm, zenith and zenith++ read the declared feature groups (models/features.py: ids, history mean,
windowed stats of user, candidate and author, context, affinity); hstu and genrank read the history as a
sequence, and their candidate tokens carry the candidate's stats plus the same user, context and affinity
features (`training.sequence_side_features`). All of them see the same rows in the same order, and every
one starts its task outputs at the base rates training hands it (`init_task_bias`).

>>> from config.schema import TrainingConfig
>>> from training.ranking_batch import RankingFeatures
>>> feats = RankingFeatures(kind="ratings", tasks=("like", "love"), stat_names=("n", "ctr"), num_users=20,
...                         num_items=50, num_authors=0, max_hist_len=16)
>>> model, config = build_ranker("zenith++", feats, TrainingConfig(d_model=16, embed_dim=8, num_heads=2))
>>> type(model).__name__, config.boost
('Zenith', 'tokenwise_moe')
>>> build_ranker("dlrm++", feats, TrainingConfig())
Traceback (most recent call last):
ValueError: training.model must be one of ['dlrm', 'hstu', ..., 'zenith-shared'], got 'dlrm++'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from config.schema import TrainingConfig
from models.dlrm import DLRM, DLRMConfig
from models.features import RankingInputSpec
from models.genrank import GenRank, HSTURanking, RankerConfig
from models.position import PositionDebiasedRanker
from models.zenith import Zenith, ZenithConfig
from training.ranking_batch import RankingFeatures


@dataclass(frozen=True)
class Ranker:
    build: Callable[[RankingFeatures, TrainingConfig], tuple[nn.Module, Any]]  # -> (model, its config)
    classes: tuple[type, ...]  # model class + config dataclasses its artifact holds
    unused_parameters: bool = False  # a step may leave parameters without gradients (DDP must look for them)
    aux_loss: Callable[[nn.Module], torch.Tensor] | None = None  # added to the task BCE of the last forward
    comparison_only: bool = False  # trained by benchmarks for a side comparison, not a contender
    reads: tuple[str, ...] = ()  # training config keys that only some rankers read (this one reads these)


def _input_spec(feats: RankingFeatures, t: TrainingConfig) -> RankingInputSpec:
    return RankingInputSpec(num_users=feats.num_users, num_items=feats.num_items,
                            num_authors=max(feats.num_authors, 1), num_actions=feats.num_actions,
                            item_dense_dim=feats.item_dense_dim, user_dense_dim=feats.user_dense_dim,
                            embed_dim=t.embed_dim)


def _dlrm(feats: RankingFeatures, t: TrainingConfig):
    config = DLRMConfig(_input_spec(feats, t), num_tasks=len(feats.tasks))
    return DLRM(config), config


def _zenith(preset: Callable[..., ZenithConfig]):
    def build(feats: RankingFeatures, t: TrainingConfig):
        config = preset(_input_spec(feats, t), num_tasks=len(feats.tasks), dim=t.d_model, num_layers=t.num_blocks,
                        num_heads=t.num_heads)
        return Zenith(config), config
    return build


def _sequence(cls: type[nn.Module]):
    def build(feats: RankingFeatures, t: TrainingConfig):
        per_head = t.d_model // t.num_heads
        side = t.sequence_side_features
        config = RankerConfig(num_items=feats.num_items, num_actions=feats.num_actions, num_tasks=len(feats.tasks),
                              num_authors=feats.num_authors, cand_dense_dim=feats.item_dense_dim,
                              max_hist_len=feats.max_hist_len, d_model=t.d_model, num_blocks=t.num_blocks,
                              num_heads=t.num_heads, d_qk=per_head, d_v=per_head, dropout=t.dropout,
                              num_users=feats.num_users if side else 0,
                              user_dense_dim=feats.user_dense_dim if side else 0, request_context=side,
                              head_dense=t.sequence_head_dense)
        return cls(config), config
    return build


def _moe_balance(model: Zenith) -> torch.Tensor:
    return model.config.aux_loss_weight * model.aux_loss


_ZENITH = (Zenith, ZenithConfig, RankingInputSpec)
_SEQUENCE_KEYS = ("sequence_side_features", "sequence_head_dense")
RANKERS: dict[str, Ranker] = {
    "dlrm": Ranker(_dlrm, (DLRM, DLRMConfig, RankingInputSpec)),
    "hstu": Ranker(_sequence(HSTURanking), (HSTURanking, RankerConfig), reads=_SEQUENCE_KEYS),
    "genrank": Ranker(_sequence(GenRank), (GenRank, RankerConfig), reads=_SEQUENCE_KEYS),
    "zenith": Ranker(_zenith(ZenithConfig.zenith), _ZENITH),
    # Zenith++'s MoE leaves unchosen experts without gradients in a step.
    "zenith++": Ranker(_zenith(ZenithConfig.zenith_pp), _ZENITH, unused_parameters=True, aux_loss=_moe_balance),
    # shared-weight attention and FFN: Zenith's token-similarity comparison (bench.quality)
    "zenith-shared": Ranker(_zenith(ZenithConfig.shared), _ZENITH, comparison_only=True),
}
CONTENDERS = tuple(name for name, r in RANKERS.items() if not r.comparison_only)


def ranker(kind: str) -> Ranker:
    """The registry entry of `kind`, or an error naming the known ones."""
    if kind not in RANKERS:
        raise ValueError(f"training.model must be one of {list(RANKERS)}, got {kind!r}")
    return RANKERS[kind]


def config_keys_not_read_by(kind: str) -> set[str]:
    """Training config keys that only other rankers read: a change in them does not change a `kind` run."""
    return {key for r in RANKERS.values() for key in r.reads} - set(ranker(kind).reads)


def build_ranker(kind: str, feats: RankingFeatures, t: TrainingConfig, base_rates: Sequence[float] | None = None):
    """(model, its config dataclass) for `kind`; the config is what the artifact stores. With `base_rates`
    (one per task, in (0, 1)) the task outputs start at their log-odds."""
    model, config = ranker(kind).build(feats, t)
    if base_rates is not None:
        model.init_task_bias(torch.tensor(base_rates, dtype=torch.float32))
    return model, config


def build_trainable(kind: str, feats: RankingFeatures, t: TrainingConfig, base_rates: Sequence[float] | None = None):
    """(what training fits, the ranker's config): the ranker, with the display-slot offsets when
    `position_bias_slots` asks for them."""
    model, config = build_ranker(kind, feats, t, base_rates)
    if not t.position_bias_slots:
        return model, config
    if feats.kind != "livestream":
        raise ValueError(f"training.position_bias_slots={t.position_bias_slots} needs samples in display order "
                         f"(livestream); these are {feats.kind!r}: set training.position_bias_slots=0")
    return PositionDebiasedRanker(model, t.position_bias_slots, len(feats.tasks)), config


def ranker_of(model: nn.Module) -> nn.Module:
    """The ranker inside what `build_trainable` returned (what the artifact stores)."""
    return model.ranker if isinstance(model, PositionDebiasedRanker) else model


def extra_loss(kind: str, model: nn.Module) -> torch.Tensor | float:
    """Loss terms the `kind` model adds beyond the task BCE, from its last forward."""
    aux = ranker(kind).aux_loss
    return aux(ranker_of(model)) if aux is not None else 0.0
