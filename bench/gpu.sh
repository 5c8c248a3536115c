#!/usr/bin/env bash
# Every GPU check of the project in one run of a few minutes, for a lent GPU machine (the `device` tool):
#     run(command="bash bench/gpu.sh", timeout_s=480)
# It uses that machine's own python3 (PyTorch, Triton, pytest and hypothesis are installed there) with this tree
# on PYTHONPATH; the model code needs nothing else. Logs and JSON go to $OUT (the device tool brings them back)
# or bench/results/gpu/. Without CUDA it runs the same tests (the GPU ones skip), says so and exits 0, so the
# script can be tried on the CPU first: `PY=.venv/bin/python bash bench/gpu.sh`.
# Checks: the compiled Triton kernels against their PyTorch reference (fp32, bf16), the kernel and training-step
# benchmarks (BENCHMARKS.md, "Triton HSTU pointwise attention on a GPU" and "Training step on a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEST=${OUT:-bench/results/gpu}
mkdir -p "$DEST"
failed=()

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" = 0 ] || failed+=("$name")
}

nvidia-smi -L 2>/dev/null || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device here: the GPU tests skip and the GPU benchmarks are not run"
    step kernel_tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_kernels.py -m gpu
    exit 0
fi

step kernel_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_kernels.py -m gpu
step kernels 150 "$PY" -m bench.models.kernels --out "$DEST/kernels.json"
step train_gpu 150 "$PY" -m bench.models.train_gpu
cp bench/results/models_train_gpu.json "$DEST/" 2>/dev/null || true

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
