"""Model benchmarks on the CPU (`python -m bench.models [--quick]`).

- `bench.models.mfalcon`: M-FALCON candidate scoring vs one full forward pass per candidate.
- `bench.models.train_throughput`: training steps of HSTU (interleaved) ranking vs GenRank on the
  same batches.
- `bench.models.kernels`: the Triton attention kernels on a GPU (separate command; its JSON is
  folded into bench/results/models.json under `gpu_kernels` when present).

Results go to bench/results/models.json with the machine, the command and the date.
"""
