"""GPU training-step throughput of HSTU ranking vs GenRank (bf16 autocast, Triton attention).

    python -m bench.models.train_gpu        # needs CUDA; writes bench/results/models_train_gpu.json

Same models, batches and step as `bench.models.train_throughput` (the CPU figure), on one GPU.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from models.genrank import GenRank, HSTURanking, RankerConfig
from models.inputs import random_ranking_inputs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "models_train_gpu.json"


def step_time(model, opt, batches, labels) -> float:
    def epoch() -> None:
        for inp, y in zip(batches, labels):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(inp, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch()  # warm-up: kernel compilation, allocator, Adam state
    torch.cuda.synchronize()
    start = time.perf_counter()
    epoch()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.models.train_gpu needs a CUDA device", file=sys.stderr)
        return 2
    cfg = RankerConfig(num_items=100_000, num_actions=9, num_tasks=3, num_authors=10_000, cand_dense_dim=6,
                       max_hist_len=512, d_model=128, num_blocks=3, num_heads=2, d_qk=64, d_v=64, dropout=0.0)
    rows = []
    for batch_size in (32, 128, 512):
        g = torch.Generator().manual_seed(0)
        batches = [random_ranking_inputs(batch_size=batch_size, hist_len=256, num_candidates=64,
                                         num_items=cfg.num_items, num_authors=cfg.num_authors,
                                         num_actions=cfg.num_actions, item_dense_dim=cfg.cand_dense_dim,
                                         generator=g).to("cuda") for _ in range(5)]
        labels = [torch.randint(0, 2, (batch_size, 64, cfg.num_tasks), generator=g).float().cuda() for _ in range(5)]
        for name, cls in (("hstu", HSTURanking), ("genrank", GenRank)):
            torch.manual_seed(0)
            model = cls(cfg).cuda().train()
            t = step_time(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches, labels)
            rows.append({"model": name, "batch_size": batch_size, "step_ms": round(t * 1000, 2),
                         "samples_per_s": round(batch_size / t, 1)})
            print(rows[-1], flush=True)
            del model
    speedups = {b: next(r["samples_per_s"] for r in rows if r["model"] == "genrank" and r["batch_size"] == b)
                / next(r["samples_per_s"] for r in rows if r["model"] == "hstu" and r["batch_size"] == b)
                for b in (32, 128, 512)}
    out = {"command": "python -m bench.models.train_gpu", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": torch.cuda.get_device_name(), "torch": torch.__version__,
           "setup": "d=128, 3 blocks, 2 heads x 64, history 256 events, 64 candidates, bf16 autocast, Adam",
           "rows": rows, "genrank_vs_hstu_speedup_by_batch": speedups}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(speedups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
