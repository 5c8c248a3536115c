"""bench.models.mfalcon at a tiny shape: the one-pass columns, their agreement with M-FALCON, trained weights."""

from __future__ import annotations

import math

import torch

from bench.models import mfalcon
from models.genrank import GenRank, RankerConfig
from training.artifact import save_artifact

CFG = RankerConfig(num_items=50, num_actions=5, num_tasks=2, num_authors=10, cand_dense_dim=3, max_hist_len=8,
                   d_model=16, num_blocks=2, num_heads=2, d_qk=8, d_v=8, dropout=0.0, head_hidden=16)
SHAPE = dict(hist_lens=(8,), cand_counts=(6,), micro_batch=4, baseline_sample=3, baseline_rows=(1,), repeats=1)
ONE_PASS = ("one_pass_cands_per_s", "one_pass_s", "speedup_vs_one_pass", "max_abs_diff_vs_one_pass")


def test_one_pass_columns_are_finite_and_agree_with_mfalcon():
    torch.manual_seed(0)
    rows = mfalcon.run(CFG, **SHAPE)
    assert {r["model"] for r in rows} == {"hstu", "genrank"}
    for r in rows:
        assert r["weights"] == "random" and r["one_pass_skipped"] is None
        assert all(math.isfinite(r[k]) for k in ONE_PASS)
        assert r["max_abs_diff_vs_one_pass"] < 1e-4  # the same scores, computed two ways
    assert "1-pass c/s" in mfalcon.table(rows)


def test_one_pass_above_the_token_cap_is_skipped_and_said_so():
    rows = mfalcon.run(CFG, **SHAPE, one_pass_max_tokens=10)
    assert all(r["one_pass_skipped"] and r["max_abs_diff_vs_one_pass"] is None for r in rows)
    assert "skipped" in mfalcon.table(rows) and mfalcon.max_diffs(rows)["mfalcon_max_abs_diff_vs_one_pass"] is None


def test_an_artifact_replaces_the_random_models(tmp_path):
    torch.manual_seed(0)
    save_artifact(tmp_path / "gr", GenRank(CFG), CFG)
    # a history longer than the artifact's max_hist_len is scored at max_hist_len
    rows = mfalcon.run(None, **{**SHAPE, "hist_lens": (8, 20)}, artifact=str(tmp_path / "gr"))
    assert [(r["model"], r["n"]) for r in rows] == [("genrank", 8)]
    assert rows[0]["weights"] == f"trained ({tmp_path / 'gr'})"
    assert rows[0]["max_abs_diff_vs_one_pass"] < 1e-4


def test_an_artifact_with_side_features_gets_the_user_side_it_reads(tmp_path):
    # a ranker trained with feature parity and the heads' stats path: a user table and 5 user stats
    cfg = RankerConfig(**{**CFG.__dict__, "num_users": 30, "user_dense_dim": 5, "request_context": True,
                          "head_dense": True})
    torch.manual_seed(0)
    save_artifact(tmp_path / "gr", GenRank(cfg), cfg)
    rows = mfalcon.run(None, **SHAPE, artifact=str(tmp_path / "gr"))
    assert rows[0]["max_abs_diff_vs_one_pass"] < 1e-4 and rows[0]["max_abs_diff"] < 1e-4
