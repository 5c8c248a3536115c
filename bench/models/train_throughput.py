"""Training-step throughput: HSTU ranking (interleaved item/action tokens) vs GenRank.

Both models get the same `RankerConfig` and the very same `RankingInputs` batches; a step is
forward + multi-task BCE + backward + Adam. HSTU sees 2·L + C tokens per request, GenRank L + C.
Reported per model: samples/s (requests), events/s (history events + candidates) and model tokens/s.
"""

from __future__ import annotations

import torch

from bench.models.mfalcon import best_time
from models.genrank import GenRank, HSTURanking, RankerConfig
from models.inputs import random_ranking_inputs


def epoch(model, opt, batches, labels) -> None:
    for inp, y in zip(batches, labels):
        loss = model.loss(inp, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run(cfg: RankerConfig, batch_size: int, hist_len: int, num_candidates: int, steps: int,
        repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = [random_ranking_inputs(batch_size=batch_size, hist_len=hist_len, num_candidates=num_candidates,
                                     num_items=cfg.num_items, num_authors=cfg.num_authors,
                                     num_actions=cfg.num_actions, item_dense_dim=cfg.cand_dense_dim, generator=g)
               for _ in range(steps)]
    labels = [torch.randint(0, 2, (batch_size, num_candidates, cfg.num_tasks), generator=g).float()
              for _ in range(steps)]
    models = {}
    for name, cls in (("hstu", HSTURanking), ("genrank", GenRank)):
        torch.manual_seed(0)
        model = cls(cfg).train()
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))
        epoch(*models[name], batches, labels)  # warm-up: allocator, Adam state
    # The two models take turns, so a busy spell on the shared machine does not land on one side only.
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for name, (model, opt) in models.items():
            best[name] = min(best[name], best_time(epoch, 1, model, opt, batches, labels)[0] / steps)
    rows = []
    events = float(sum(int(b.hist_lengths.sum() + b.num_candidates.sum()) for b in batches) / steps)
    for name, t in best.items():
        per_req_tokens = (2 if name == "hstu" else 1) * hist_len + num_candidates
        rows.append(dict(model=name, step_s=t, samples_per_s=batch_size / t, events_per_s=events / t,
                         tokens_per_s=batch_size * per_req_tokens / t, padded_tokens_per_request=per_req_tokens,
                         batch_size=batch_size, hist_len=hist_len, num_candidates=num_candidates))
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'model':8} {'tokens/req':>10} {'step s':>8} {'samples/s':>10} {'events/s':>10} {'tokens/s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:8} {r['padded_tokens_per_request']:10d} {r['step_s']:8.3f} "
                     f"{r['samples_per_s']:10.1f} {r['events_per_s']:10.0f} {r['tokens_per_s']:10.0f}")
    return "\n".join(lines)
