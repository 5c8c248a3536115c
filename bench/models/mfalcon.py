"""M-FALCON vs scoring each candidate with its own full forward pass (history + that candidate).

For each model (HSTU ranking, research form with interleaved tokens; GenRank), history length n
(events) and candidate count m, one user is scored:
- M-FALCON: `MFalconScorer(model, micro_batch).score(...)`, prefill included, no cache;
- baseline: `model(...)` on rows of [history, one candidate], r rows per call for each r in
  `baseline_rows` (the fastest r is kept). Its cost per candidate does not depend on m, so it is timed
  on a sample of candidates once per (model, n) and candidates/s is extrapolated to every m.
The score difference is the max |M-FALCON - baseline| over the sampled candidates, all tasks.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from models.genrank import GenRank, HSTURanking, RankerConfig
from models.inputs import RankingInputs, random_ranking_inputs
from models.mfalcon import MFalconScorer


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
    inp = random_ranking_inputs(batch_size=1, hist_len=n, num_candidates=m, num_items=cfg.num_items,
                                num_authors=cfg.num_authors, num_actions=cfg.num_actions,
                                item_dense_dim=cfg.cand_dense_dim, generator=g)
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


def run(cfg: RankerConfig, hist_lens, cand_counts, micro_batch: int, baseline_sample: int,
        baseline_rows: tuple[int, ...], repeats: int) -> list[dict]:
    rows = []
    models = {"hstu": HSTURanking(cfg).eval(), "genrank": GenRank(cfg).eval()}
    with torch.no_grad():
        for name, model in models.items():
            tokens_per_event = 2 if name == "hstu" else 1
            for n in hist_lens:
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
                    rows.append(dict(model=name, n=n, tokens=n * tokens_per_event, m=m, micro_batch=micro_batch,
                                     mfalcon_cands_per_s=m / t, mfalcon_s=t, baseline_cands_per_s=base_cps,
                                     baseline_sampled=len(sample), baseline_rows_per_forward=base_rows,
                                     speedup=(m / t) / base_cps,
                                     max_abs_diff=diff))
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'model':8} {'n':>5} {'tokens':>6} {'m':>5} {'M-FALCON c/s':>13} {'baseline c/s':>13} "
            f"{'speedup':>8} {'max|diff|':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:8} {r['n']:5d} {r['tokens']:6d} {r['m']:5d} {r['mfalcon_cands_per_s']:13.0f} "
                     f"{r['baseline_cands_per_s']:13.1f} {r['speedup']:7.1f}x {r['max_abs_diff']:10.2e}")
    return "\n".join(lines)
