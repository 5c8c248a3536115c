"""bench.quality's record: an earlier run's models are merged only when they saw the same data and config."""

from __future__ import annotations

import pytest

from bench.quality import (
    MODELS,
    comparable_config,
    differences,
    interval95,
    mergeable,
    paired_difference,
    summarise_seeds,
)
from config.schema import TrainingConfig

DATA = {"events": 100, "requests": 10, "candidates": 80, "contract": {"num_items": "50", "tasks": "click"}}


def test_models_of_the_same_data_and_config_are_merged_the_others_named(capsys):
    training = comparable_config(TrainingConfig(model="dlrm", run_name="a"))
    # what a run is called and which model it trains do not make two runs incomparable
    assert training == comparable_config(TrainingConfig(model="genrank", run_name="b", storage_path="elsewhere",
                                                        seed=2))
    other = comparable_config(TrainingConfig(batch_size=256))
    earlier = {"data": DATA, "dlrm": {"auc": 0.8, "config": training}, "genrank": {"auc": 0.79, "config": other}}
    assert mergeable(earlier, DATA, training) == {"dlrm": earlier["dlrm"]}
    assert "genrank: its training config differs in batch_size (256 then, 128 now)" in capsys.readouterr().out

    rebuilt = {**DATA, "contract": {**DATA["contract"], "num_items": "60"}}
    assert mergeable(earlier, rebuilt, training) == {}
    assert "data differ in contract.num_items ('50' then, '60' now)" in capsys.readouterr().out
    assert mergeable({"dlrm": {"auc": 0.8}}, DATA, training) == {}  # a record from before data were recorded
    assert "data differ in candidates (None then, 80 now)" in capsys.readouterr().out
    assert mergeable({}, DATA, training) == {} and capsys.readouterr().out == ""  # nothing to merge, nothing to say


def test_a_flag_only_the_sequence_rankers_read_does_not_keep_other_models_out(capsys):
    earlier_config = comparable_config(TrainingConfig(sequence_head_dense=False))
    now = comparable_config(TrainingConfig(sequence_head_dense=True))
    earlier = {"data": DATA, "dlrm": {"auc": 0.8, "config": earlier_config},
               "genrank": {"auc": 0.79, "config": earlier_config}}
    assert mergeable(earlier, DATA, now) == {"dlrm": earlier["dlrm"]}
    said = capsys.readouterr().out
    assert "genrank: its training config differs in sequence_head_dense (False then, True now)" in said


def test_differences_names_nested_keys_with_both_values():
    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == ["b.c (2 then, 3 now)",
                                                                                   "d (None then, 4 now)"]
    assert "zenith-shared" not in MODELS and "dlrm" in MODELS


def _run(auc: float, seconds: float = 10.0) -> dict:
    task = {"auc": auc, "gauc": auc - 0.01, "logloss": 0.2, "ne": 0.9, "calibration": 1.0}
    return {**task, "last10_auc": auc + 0.01, "last10_gauc": auc, "last10_logloss": 0.19, "seconds": seconds,
            "requests_per_s": 100.0, "candidates": 80, "prior": [0.1], "config": {"lr": 0.001},
            "tasks": {"click": task}, "auc_over_time": [{"ts": 1, "auc": auc}, {"ts": 2, "auc": auc + 0.02}]}


def test_seeds_are_summarised_as_means_with_t_intervals_and_compared_to_dlrm_pairwise():
    genrank = summarise_seeds({"0": _run(0.80), "1": _run(0.82), "2": _run(0.81)})
    assert genrank["n_seeds"] == 3 and genrank["auc"] == pytest.approx(0.81)
    # t(0.975, 2) = 4.303, sd 0.01: half-width 4.303 * 0.01 / sqrt(3) = 0.0248
    assert genrank["auc_ci95"] == [0.7852, 0.8348] == interval95([0.80, 0.81, 0.82])
    assert genrank["tasks"]["click"]["auc"] == pytest.approx(0.81)
    assert [p["auc"] for p in genrank["auc_over_time"]] == pytest.approx([0.81, 0.83])
    one = summarise_seeds({"0": _run(0.8)})
    assert one["auc_ci95"] is None and one["n_seeds"] == 1
    # the seeds' own spread is large, the paired difference is not: every seed is 0.02 above its DLRM run
    dlrm = summarise_seeds({"0": _run(0.78), "1": _run(0.80), "2": _run(0.79), "3": _run(0.5)})
    diff = paired_difference(genrank, dlrm)
    assert diff["mean"] == pytest.approx(0.02) and diff["seeds"] == [0, 1, 2]
    assert diff["ci95"] == pytest.approx([0.02, 0.02], abs=1e-4)
