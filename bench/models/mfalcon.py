"""M-FALCON vs the two ways a ranker can score m candidates without it.

For each model (HSTU ranking, research form with interleaved tokens; GenRank), history length n
(events) and candidate count m, one user is scored:
- M-FALCON: `MFalconScorer(model, micro_batch).score(...)`, prefill included, no cache;
- per-candidate baseline: `model(...)` on rows of [history, one candidate], r rows per call for each r
  in `baseline_rows` (the fastest r is kept). Its cost per candidate does not depend on m, so it is
  timed on a sample of candidates once per (model, n) and candidates/s is extrapolated to every m;
  `max_abs_diff` is the max |M-FALCON - baseline| over the sampled candidates, all tasks;
- one-pass baseline: `model(...)` on [history, all m candidates] in one forward with the model's own
  candidate mask (candidates see the history and themselves), timed at every m;
  `max_abs_diff_vs_one_pass` is the max |M-FALCON - one pass| over all m candidates, all tasks. Its
  attention is quadratic in n·tokens_per_event + m, so above `one_pass_max_tokens` tokens it is not run
  and the row says so in `one_pass_skipped`. The default 8192 lets every default shape run: the largest,
  HSTU n=512 m=4096, is 5120 tokens, about 9 s and 2 GB per forward on one CPU thread.
By default both models have random weights (`weights: random`); with `artifact`, the trained ranker of
that artifact folder is benchmarked instead, on inputs drawn from its own vocabularies, and history
lengths above its `max_hist_len` are lowered to it (it has no positions beyond).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from models.genrank import GenRank, HSTURanking, RankerConfig
from models.heads import SequenceRanker
from models.inputs import RankingInputs, random_ranking_inputs
from models.mfalcon import MFalconScorer
from training.artifact import load_artifact


def best_time(fn, repeats: int, *args):
    """(best wall time of `repeats` calls of fn(*args), last result): on a shared machine the minimum
    is the least disturbed run."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def one_user(n: int, m: int, cfg: RankerConfig, seed: int = 0) -> RankingInputs:
    g = torch.Generator().manual_seed(seed)
    # the user side as the model reads it (a trained ranker with side features has a user table and user stats)
    inp = random_ranking_inputs(batch_size=1, hist_len=n, num_candidates=m, num_items=cfg.num_items,
                                num_authors=cfg.num_authors, num_users=max(cfg.num_users, 1),
                                num_actions=cfg.num_actions, item_dense_dim=cfg.cand_dense_dim,
                                user_dense_dim=cfg.user_dense_dim, generator=g)
    return replace(inp, hist_lengths=torch.tensor([n]), num_candidates=torch.tensor([m]))


def rows_for(inp: RankingInputs, idx: list[int]) -> RankingInputs:
    """One row per candidate in `idx`: the same history, that candidate alone."""
    r = len(idx)
    def rep(t):
        return t.expand(r, *t.shape[1:]).contiguous()
    cand = torch.tensor(idx)[:, None]
    return replace(
        inp,
        user_ids=rep(inp.user_ids), request_ts=rep(inp.request_ts), hist_item_ids=rep(inp.hist_item_ids),
        hist_author_ids=rep(inp.hist_author_ids), hist_actions=rep(inp.hist_actions), hist_ts=rep(inp.hist_ts),
        hist_lengths=rep(inp.hist_lengths), cand_item_ids=inp.cand_item_ids[0, cand],
        cand_author_ids=inp.cand_author_ids[0, cand], num_candidates=torch.ones(r, dtype=torch.long),
        cand_dense=inp.cand_dense[0, cand], user_dense=rep(inp.user_dense),
    )


def baseline_scores(model, inp: RankingInputs, sample: list[int], rows: int) -> torch.Tensor:
    """Scores [len(sample), T]: each candidate in its own sequence, `rows` such sequences per call."""
    return torch.cat([model(rows_for(inp, sample[s:s + rows]))[:, 0] for s in range(0, len(sample), rows)])


def trained_model(artifact: str) -> tuple[str, SequenceRanker]:
    """(row name, eval-mode model) of a ranking artifact; only sequence rankers have an M-FALCON path."""
    model, manifest = load_artifact(artifact)
    if not isinstance(model, HSTURanking | GenRank):
        raise ValueError(f"{artifact}: {manifest.model_class} is not a sequence ranker (HSTURanking, GenRank)")
    return ("hstu" if isinstance(model, HSTURanking) else "genrank"), model


def run(cfg: RankerConfig | None, hist_lens, cand_counts, micro_batch: int, baseline_sample: int,
        baseline_rows: tuple[int, ...], repeats: int, artifact: str | None = None,
        one_pass_max_tokens: int = 8192) -> list[dict]:
    """Rows of the comparison; with `artifact`, its trained model and config replace `cfg` (may be None)
    and the two random models."""
    if artifact is None:
        models = {"hstu": HSTURanking(cfg).eval(), "genrank": GenRank(cfg).eval()}
        weights = "random"
    else:
        name, model = trained_model(artifact)
        models, weights = {name: model}, f"trained ({artifact})"
    rows = []
    with torch.no_grad():
        for name, model in models.items():
            cfg = model.cfg
            tokens_per_event = 2 if name == "hstu" else 1
            for n in sorted({min(h, cfg.max_hist_len) for h in hist_lens}):
                base_inp = one_user(n, max(cand_counts), cfg, seed=n)
                sample = list(range(min(baseline_sample, max(cand_counts))))
                # the baseline gets its better batching: one row per forward, or several rows per forward
                t_base, base_rows = float("inf"), None
                for r in baseline_rows:
                    t_r, base_out = best_time(baseline_scores, repeats, model, base_inp, sample, r)
                    if t_r < t_base:
                        t_base, base_rows = t_r, r
                base_cps = len(sample) / t_base
                for m in cand_counts:
                    inp = replace(base_inp, cand_item_ids=base_inp.cand_item_ids[:, :m],
                                  cand_author_ids=base_inp.cand_author_ids[:, :m],
                                  cand_dense=base_inp.cand_dense[:, :m], num_candidates=torch.tensor([m]))
                    scorer = MFalconScorer(model, micro_batch=micro_batch)
                    t, scores = best_time(scorer.score, repeats, inp)
                    k = min(m, len(sample))
                    diff = (scores[0, :k] - base_out[:k]).abs().max().item()
                    row = dict(model=name, weights=weights, n=n, tokens=n * tokens_per_event, m=m,
                               micro_batch=micro_batch, mfalcon_cands_per_s=m / t, mfalcon_s=t,
                               baseline_cands_per_s=base_cps, baseline_sampled=len(sample),
                               baseline_rows_per_forward=base_rows, speedup=(m / t) / base_cps, max_abs_diff=diff,
                               one_pass_cands_per_s=None, one_pass_s=None, speedup_vs_one_pass=None,
                               max_abs_diff_vs_one_pass=None, one_pass_skipped=None)
                    one_pass_tokens = n * tokens_per_event + m
                    if one_pass_tokens > one_pass_max_tokens:
                        row["one_pass_skipped"] = f"{one_pass_tokens} tokens > {one_pass_max_tokens}"
                    else:
                        t_one, one = best_time(model, repeats, inp)
                        row.update(one_pass_cands_per_s=m / t_one, one_pass_s=t_one, speedup_vs_one_pass=t_one / t,
                                   max_abs_diff_vs_one_pass=(scores - one).abs().max().item())
                    rows.append(row)
    return rows


def max_diffs(rows: list[dict]) -> dict:
    """The largest |M-FALCON - baseline| and |M-FALCON - one pass| over the rows (None if never run)."""
    one_pass = [r["max_abs_diff_vs_one_pass"] for r in rows if r["max_abs_diff_vs_one_pass"] is not None]
    return dict(mfalcon_max_abs_diff=max(r["max_abs_diff"] for r in rows),
                mfalcon_max_abs_diff_vs_one_pass=max(one_pass, default=None))


def table(rows: list[dict]) -> str:
    head = (f"{'model':8} {'n':>5} {'tokens':>6} {'m':>5} {'M-FALCON c/s':>13} {'per-cand c/s':>13} "
            f"{'x per-cand':>10} {'|d| per-cand':>12} {'1-pass c/s':>10} {'x 1-pass':>8} {'|d| 1-pass':>10}  weights")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["one_pass_skipped"]:
            one = f"{'skipped: ' + r['one_pass_skipped']:>30}"
        else:
            one = (f"{r['one_pass_cands_per_s']:10.0f} {r['speedup_vs_one_pass']:7.1f}x "
                   f"{r['max_abs_diff_vs_one_pass']:10.2e}")
        lines.append(f"{r['model']:8} {r['n']:5d} {r['tokens']:6d} {r['m']:5d} {r['mfalcon_cands_per_s']:13.0f} "
                     f"{r['baseline_cands_per_s']:13.1f} {r['speedup']:9.1f}x {r['max_abs_diff']:12.2e} "
                     f"{one}  {r['weights']}")
    return "\n".join(lines)
