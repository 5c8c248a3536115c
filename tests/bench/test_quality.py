"""bench.quality's record: an earlier run's models are merged only when they saw the same data and config."""

from __future__ import annotations

from bench.quality import MODELS, comparable_config, differences, mergeable
from config.schema import TrainingConfig

DATA = {"events": 100, "requests": 10, "candidates": 80, "contract": {"num_items": "50", "tasks": "click"}}


def test_models_of_the_same_data_and_config_are_merged_the_others_named(capsys):
    training = comparable_config(TrainingConfig(model="dlrm", run_name="a"))
    # what a run is called and which model it trains do not make two runs incomparable
    assert training == comparable_config(TrainingConfig(model="genrank", run_name="b", storage_path="elsewhere"))
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


def test_differences_names_nested_keys_with_both_values():
    assert differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == ["b.c (2 then, 3 now)",
                                                                                   "d (None then, 4 now)"]
    assert "zenith-shared" not in MODELS and "dlrm" in MODELS
