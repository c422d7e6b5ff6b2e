#!/usr/bin/env bash
# The workload guarantees on GPUs (run from the repository root on a 2-GPU CUDA machine):
#   bash benchmarks/gpu_zoo.sh tests OUT   device digests on CUDA equal the CPU reference; the CUDA
#                                          tests (pinned copies, CUDA RNG, kills on one GPU and over
#                                          NCCL); rank-local state found by device digests over NCCL
#   bash benchmarks/gpu_zoo.sh zoo OUT     the DDP+BatchNorm and FSDP2 workloads of the zoo killed
#                                          three times from outside, over NCCL, ending bitwise equal
#                                          (tests/workloads/test_workloads.py: the scripts take run.device);
#                                          then the per-step cost of the exact full-state digest on a
#                                          GPT-2-small bf16 step
set -uo pipefail
phase=${1:?tests or zoo}
out=${2:-bench_out/gpu_zoo}
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'; } | tee "$out/machine.txt"
pytest=(python3 -m pytest -q -rA -p no:cacheprovider --timeout 280)
if [ "$phase" = tests ]; then
    timeout 540 "${pytest[@]}" tests/replay/test_cuda_digests.py tests/distributed/test_rank_local.py tests/snapshots/test_cuda.py \
        -k "test_cuda or nccl" >"$out/gpu_tests.txt" 2>&1
    echo "gpu tests rc=$?" | tee -a "$out/machine.txt"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$out/gpu_tests.txt" | tail -30
else
    timeout 400 "${pytest[@]}" tests/workloads/test_workloads.py -k "cnn_ddp or fsdp2" >"$out/zoo_nccl.txt" 2>&1
    echo "zoo rc=$?" | tee -a "$out/machine.txt"
    tail -25 "$out/zoo_nccl.txt"
    timeout 150 python3 benchmarks/log_overhead.py --size gpt2-small --batch 8 --device cuda --digest-only \
        --steps 40 --warmup 10 --reps 3 --dir /tmp/moai-bench-digest --json "$out/state_digest_gpu.json" 2>&1 |
        tee "$out/state_digest_gpu.txt"
fi
