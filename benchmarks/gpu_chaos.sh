#!/usr/bin/env bash
# The chaos harness on a GPU machine, in two phases (run from the repository root):
#
#   bash benchmarks/gpu_chaos.sh trials OUT [TRIALS] [JOBS]   # any machine with many cores
#     TRIALS seeded random-fault trials of the demo on 2 CPU ranks (gloo), JOBS at a time;
#   bash benchmarks/gpu_chaos.sh matrix OUT                   # the `kills` and `full` scenarios, CPU ranks
#   bash benchmarks/gpu_chaos.sh first OUT                    # e.g. on an H100
#     1. a restart on another device type, both ways (CUDA -> CPU, CPU -> CUDA), one rank per GPU;
#     2. the `handoff` scenario up to its handoff: OUT/handoff.tar holds the trial, to continue elsewhere.
#   bash benchmarks/gpu_chaos.sh second OUT HANDOFF_TAR      # e.g. on an H200
#     1. the handed-off trial continued here and judged against the first machine's reference;
#     2. the device-type restarts again, on every GPU of this machine.
#
# `moai-ckpt` need not be installed: the CLI runs as `python3 -c 'from moai_ckpt.cli import main; main()'`.
set -uo pipefail
phase=${1:?first or second}
out=${2:?output directory}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
cli=(python3 -c 'from moai_ckpt.cli import main; main()')
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/machine-$phase.txt"
echo "cpus $(nproc), torch $(python3 -c 'import torch; print(torch.__version__)')" | tee -a "$out/machine-$phase.txt"

device_changes() {  # CUDA -> CPU and CPU -> CUDA, one rank per GPU
    for scenario in gpu-to-cpu cpu-to-gpu; do
        echo "== $scenario on $gpus rank(s)"
        timeout 240 "${cli[@]}" chaos run "$scenario" --ranks "$gpus" --steps 30 --out "/tmp/chaos-$scenario" 2>&1 |
            grep -v '^\s*$' | tail -28
        cp "/tmp/chaos-$scenario/report.json" "$out/$scenario-$phase.json" 2>/dev/null
    done
}

if [ "$phase" = trials ]; then
    trials=${3:-50}
    jobs=${4:-7}
    export CUDA_VISIBLE_DEVICES="" MOAI_CKPT_DEVICE=cpu
    echo "== $trials random-fault trials of the demo, 2 CPU ranks, $jobs at a time"
    timeout 570 "${cli[@]}" chaos run smoke --random-faults 3 --trials "$trials" --jobs "$jobs" --seed 1000 --steps 30 \
        --out /tmp/chaos-random 2>&1 | grep -v '^\s*$' | tail -40
    cp /tmp/chaos-random/report.json "$out/random-trials.json"
elif [ "$phase" = matrix ]; then
    export CUDA_VISIBLE_DEVICES="" MOAI_CKPT_DEVICE=cpu
    for scenario in kills full; do  # the fault matrices, side by side
        timeout 560 "${cli[@]}" chaos run "$scenario" --out "/tmp/chaos-$scenario" >"$out/$scenario.txt" 2>&1 &
    done
    wait
    for scenario in kills full; do
        grep -v '^\s*$' "$out/$scenario.txt" | tail -30
        cp "/tmp/chaos-$scenario/report.json" "$out/$scenario.json" 2>/dev/null
    done
elif [ "$phase" = first ]; then
    device_changes
    echo "== handoff, first half"
    timeout 200 "${cli[@]}" chaos run handoff --ranks 1 --steps 30 --out handoff 2>&1 | grep -v '^\s*$' | tail -6
    tar cf "$out/handoff.tar" handoff
else
    tar xf "${3:?the handoff tarball}"
    echo "== handoff, second half"
    timeout 200 "${cli[@]}" chaos run handoff --ranks 1 --steps 30 --out handoff 2>&1 | grep -v '^\s*$' | tail -28
    cp handoff/report.json "$out/handoff.json"
    cp handoff/seed-0/timeline.png "$out/handoff-timeline.png" 2>/dev/null
    device_changes
fi
