#!/usr/bin/env bash
# The op-stream log on GPUs, in one go (run from the repository root on a CUDA machine):
#   1. the logging-overhead / replay-speed / recovery benchmark on a GPT-2-small bf16 step
#      (e2e_log.py, deterministic algorithms so that the replay can be checked bitwise);
#   2. the CUDA tests: fault_tolerant killed in every phase on one GPU (CUDA RNG, pinned copies)
#      and, with two GPUs, one of two NCCL ranks killed, resumed bitwise.
# Usage: bash benchmarks/gpu_log.sh OUT_DIR [STEPS] [PYTEST -k EXPRESSION]
set -uo pipefail
out=${1:-bench_out/gpu}
steps=${2:-50}
select=${3:-}
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())' | tee -a "$out/gpu.txt"
if [ "$steps" -gt 0 ]; then
    timeout 280 python3 benchmarks/e2e_log.py --size gpt2-small --batch 8 --device cuda --steps "$steps" \
        --warmup 10 --reps "${REPS:-5}" --variants default,log_sync,group16,lag4 --replay --deterministic \
        --dir /tmp/moai-bench-log --json "$out/log_overhead_gpu.json" 2>&1 | tee "$out/log_overhead_gpu.txt"
fi
timeout 280 python3 -m pytest -q -rA -x --timeout 150 -p no:cacheprovider tests/snapshots/test_cuda.py ${select:+-k "$select"} \
    >"$out/gpu_tests.txt" 2>&1
tail -40 "$out/gpu_tests.txt"
