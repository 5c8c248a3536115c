"""Sample rows -> RankingInputs: truncation, padding, rating tokens, id folding, stats, labels."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from ingestion.contract import ACTION_INDEX, ACTIONS
from training.ranking_batch import RankingFeatures, encode, labels

FEATS = RankingFeatures(kind="livestream", tasks=("click", "like"), stat_names=("a", "b"), num_users=100,
                        num_items=40, num_authors=10, max_hist_len=3)


def rows(**changes) -> pa.Table:
    base = {
        "user_id": [7, 130], "request_ts": pa.array([9_000_000_000, 9_500_000_000], pa.timestamp("us", "UTC")),
        "hist_item_ids": [[1, 2, 3, 4, 5], []], "hist_author_ids": [[1, 1, 2, 2, 3], []],
        "hist_actions": [[ACTION_INDEX["click"]] * 4 + [ACTION_INDEX["rate"]], []],
        "hist_ts": [[1000, 2000, 3000, 4000, 5000], []], "hist_values": [[0.0, 0.0, 0.0, 0.0, 4.0], []],
        "cand_item_ids": [[10, 41], [3]], "cand_author_ids": [[2, 12], [1]],
        "user_stats": [[1.0, 0.5], [0.0, 0.0]],
        "cand_item_stats": [[[100.0, 0.1], [0.0, 0.0]], [[3.0, -2.0]]],
        "cand_author_stats": [[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0]]],
        "label_click": [[1, 0], [0]], "label_like": [[0, 1], [1]],
    }
    base.update(changes)
    return pa.table(base)


def test_history_keeps_the_newest_events_right_padded():
    inputs = encode(rows(), FEATS)
    assert inputs.hist_item_ids.tolist() == [[3, 4, 5], [0, 0, 0]]
    assert inputs.hist_lengths.tolist() == [3, 0]
    assert inputs.hist_ts.tolist() == [[3, 4, 5], [0, 0, 0]]  # ms -> s
    assert inputs.request_ts.tolist() == [9000, 9500]


def test_ratings_become_their_own_action_tokens():
    acts = encode(rows(), FEATS).hist_actions[0].tolist()
    assert acts == [ACTION_INDEX["click"], ACTION_INDEX["click"], len(ACTIONS) + 4]
    assert FEATS.num_actions == len(ACTIONS) + 5
    without_values = rows().drop_columns(["hist_values"])  # e.g. a store without values: plain rate token
    assert encode(without_values, FEATS).hist_actions[0, -1].item() == ACTION_INDEX["rate"]


def test_candidates_fold_unknown_ids_and_pad():
    inputs = encode(rows(), FEATS)
    assert inputs.cand_item_ids.tolist() == [[10, 1], [3, 0]]  # 41 folds to (41 - 1) % 40 + 1
    assert inputs.cand_author_ids.tolist() == [[2, 2], [1, 0]]
    assert inputs.user_ids.tolist() == [7, 30]
    assert inputs.num_candidates.tolist() == [2, 1]


def test_stats_are_log_squashed_item_then_author():
    dense = encode(rows(), FEATS).cand_dense
    assert dense.shape == (2, 2, 4)
    assert dense[0, 0].tolist() == pytest.approx([math.log1p(100), math.log1p(0.1), 0, 0], rel=1e-6)
    assert dense[1, 0, :2].tolist() == pytest.approx([math.log1p(3), -math.log1p(2)], rel=1e-6)
    assert torch.all(dense[1, 1] == 0)  # padded candidate


def test_labels_per_task_and_missing_label_column():
    y = labels(rows(), FEATS)
    assert y.shape == (2, 2, 2)
    assert y[0].tolist() == [[1, 0], [0, 1]] and y[1, 0].tolist() == [0, 1]
    with pytest.raises(KeyError, match="label_like"):
        labels(rows().drop_columns(["label_like"]), FEATS)


def test_features_round_trip_through_a_dict():
    assert RankingFeatures.from_dict(FEATS.to_dict()) == FEATS
    assert FEATS.item_dense_dim == 4 and FEATS.user_dense_dim == 2


def test_every_model_accepts_encoded_rows():
    from config.schema import TrainingConfig
    from training.ranking_models import RANKERS, build_ranker

    inputs = encode(rows(), FEATS)
    t = TrainingConfig(d_model=16, embed_dim=8, num_heads=2, num_blocks=1)
    for kind in RANKERS:
        model, _ = build_ranker(kind, FEATS, t)
        logits = model(inputs)
        assert logits.shape == (2, 2, 2), kind
        assert np.isfinite(logits.detach().numpy()).all(), kind


def test_every_model_starts_its_task_outputs_at_the_base_rates():
    """The output bias is set, nothing else: the same seeded model primed with two sets of rates differs by
    exactly the difference of their log-odds on every candidate."""
    from config.schema import TrainingConfig
    from training.ranking_models import RANKERS, build_ranker

    inputs = encode(rows(), FEATS)
    mask = inputs.candidate_mask()
    t = TrainingConfig(d_model=16, embed_dim=8, num_heads=2, num_blocks=1)
    rates, other = [0.002, 0.3], [0.5, 0.5]
    for kind in RANKERS:
        torch.manual_seed(0)
        primed = build_ranker(kind, FEATS, t, base_rates=rates)[0].eval()
        torch.manual_seed(0)
        even = build_ranker(kind, FEATS, t, base_rates=other)[0].eval()
        with torch.no_grad():
            shift = (primed(inputs) - even(inputs))[mask]
        assert torch.allclose(shift, torch.logit(torch.tensor(rates)).expand_as(shift), atol=1e-5), kind
    with pytest.raises(ValueError, match=r"2 values in \(0, 1\)"):
        build_ranker("dlrm", FEATS, t, base_rates=[0.0, 0.5])


def test_a_ranker_name_is_interpreted_in_the_registry_alone():
    from config.schema import TrainingConfig
    from training.artifact import CONFIG_CLASSES, MODEL_CLASSES
    from training.ranking_models import CONTENDERS, RANKERS, build_ranker

    for kind, entry in RANKERS.items():
        model, config = build_ranker(kind, FEATS, TrainingConfig(d_model=16, embed_dim=8, num_heads=2))
        # what the artifact must rebuild is registered with it, from the same entry
        assert type(model) in entry.classes and type(config) in entry.classes, kind
        assert all(MODEL_CLASSES.get(c.__name__) is c or CONFIG_CLASSES.get(c.__name__) is c for c in entry.classes)
    assert "zenith-shared" in RANKERS and "zenith-shared" not in CONTENDERS
    with pytest.raises(ValueError, match=r"training\.model must be one of \['dlrm'.*got 'nope'"):
        build_ranker("nope", FEATS, TrainingConfig())


def test_position_offsets_only_for_samples_in_display_order():
    from dataclasses import replace

    from config.schema import TrainingConfig
    from models.position import PositionDebiasedRanker
    from training.ranking_models import build_trainable, ranker_of

    t = TrainingConfig(model="dlrm", embed_dim=8, position_bias_slots=4)
    model, _ = build_trainable("dlrm", FEATS, t)
    assert isinstance(model, PositionDebiasedRanker) and model.position.offsets.shape == (4, 2)
    assert ranker_of(model) is model.ranker and model(encode(rows(), FEATS)).shape == (2, 2, 2)
    assert not isinstance(build_trainable("dlrm", FEATS, t.model_copy(update={"position_bias_slots": 0}))[0],
                          PositionDebiasedRanker)
    with pytest.raises(ValueError, match="position_bias_slots=4 needs samples in display order"):
        build_trainable("dlrm", replace(FEATS, kind="ratings"), t)
