#!/usr/bin/env bash
# The end-to-end benchmarks on one GPU, in one go (run from the repository root on a CUDA machine):
#   1. e2e_snapshot.py: a training loop with snapshots against the same loop without (3.6 GB state,
#      ~65 ms bf16 step, snapshots after steps 3 and 13 of 22, 3 reps; moai-ckpt and every DCP mode);
#   2. e2e_log.py: plain and logged GPT-2-small bf16 loops interleaved, 7 reps, CUDA-event timing;
#   3. restore_cold.py: cold restores of the 3.6 GB state into live GPU objects, 5 reps.
# Each writes <name>_gpu.txt and <name>_gpu.json into OUT; the three take about 8 minutes (at most
# 260 + 150 + 180 s: inside a 10-minute limit for one command).
# Wheels in .whl/ (zarr, pydantic, tenacity, crc32c... for a machine without them) are installed
# into /tmp/site first. Variables: AT (snapshot steps, e.g. 3,63), STEPS (e.g. 80), REPS, SKIP
# (e.g. "log restore" to run only the snapshot benchmark).
# Usage: bash benchmarks/gpu_e2e.sh OUT
set -uo pipefail
out=${1:-bench_out/gpu_e2e}
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
    export PYTHONPATH=$PWD:/tmp/site
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
    echo "cpus $(nproc); $(df -h /tmp | tail -1); /dev/shm $(df -h /dev/shm | tail -1 | awk '{print $4}') free"
} | tee "$out/machine_gpu.txt"
skip=" ${SKIP:-} "

run() { # name timeout command...: the log goes to /tmp, and into OUT only if the script wrote no text
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "/tmp/$name.log"
    [ -f "$out/${name}_gpu.txt" ] || cp "/tmp/$name.log" "$out/${name}_gpu.log"
}

[[ $skip == *" snapshot "* ]] || run e2e_snapshot 260 python3 benchmarks/e2e_snapshot.py --device cuda \
    --steps "${STEPS:-22}" --at "${AT:-3,13}" --reps "${REPS:-3}" --budget-s 170 --dir /tmp/moai-e2e-snapshot --out "$out"
[[ $skip == *" log "* ]] || run e2e_log 150 python3 benchmarks/e2e_log.py --device cuda --reps 7 \
    --dir /tmp/moai-e2e-log --out "$out"
[[ $skip == *" restore "* ]] || run restore_cold 180 python3 benchmarks/restore_cold.py --device cuda --reps 5 \
    --budget-s 120 --dir /tmp/moai-restore-cold --out "$out"
echo "== done ($(date +%T))"
ls -la "$out"
