#!/usr/bin/env bash
# Op capture on GPUs. Run from the repository root; the caller provides zarr/pydantic/typer/rich on
# PYTHONPATH (e.g. PYTHONPATH=/tmp/site:$PWD). Two modes, one per machine:
#
#   bash benchmarks/gpu_ops.sh capture OUT_DIR     # on the H100: train the GPT demo 4 steps with op
#                                                   # capture after each snapshot (steps 1 and 3), the
#                                                   # capture overhead benchmark, and a local replay --ops
#   bash benchmarks/gpu_ops.sh replay OUT_DIR      # on the H200, with OUT_DIR copied over from the H100:
#                                                   # replay --ops of the H100 captures on the CPU and on this
#                                                   # GPU (drift per step, first divergent op), the H200
#                                                   # replay stored as a capture, diff-ops H100 vs H200 of
#                                                   # steps 1 and 3, and the overhead benchmark
#
# OUT_DIR/run is the run directory (it moves between the machines: copy OUT_DIR whole).
set -uo pipefail
mode=${1:?capture or replay}
out=${2:?OUT_DIR}
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 COLUMNS=200
export PYTHONPATH=${PYTHONPATH:-$PWD}
run="$out/run"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_$mode.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/gpu_$mode.txt"
cli() { python3 -m moai_ckpt.cli "$@"; }

case "$mode" in
capture)
    rm -rf "$run"
    # 4 steps, a snapshot every 2: captures of steps 1 and 3 (the first step after each snapshot);
    # snapshot_every comes from GPT_DEMO_SNAPSHOT_EVERY, capture_ops from GPT_DEMO_CAPTURE_OPS
    GPT_DEMO_SNAPSHOT_EVERY=2 GPT_DEMO_CAPTURE_OPS=after_snapshot timeout 300 python3 examples/gpt_demo.py \
        --storage "$run" --steps 4 2>&1 | tail -5 | tee "$out/train_$gpu.txt"
    cli capture "$run" | tee "$out/captures_$gpu.txt"
    echo "== replay --ops on the capturing GPU (same device type: must be bitwise)" | tee "$out/replay_ops_$gpu.txt"
    timeout 300 python3 -m moai_ckpt.cli replay "$run" --ops --device cuda 2>&1 | tee -a "$out/replay_ops_$gpu.txt"
    ;;
replay)
    [ -d "$run" ] || { echo "no $run: copy the H100's OUT_DIR here first" >&2; exit 2; }
    echo "== replay --ops on the CPU (another device type)" | tee "$out/replay_ops_$gpu.txt"
    timeout 300 python3 -m moai_ckpt.cli replay "$run" --ops --device cpu 2>&1 | tee -a "$out/replay_ops_$gpu.txt"
    # the H100 captures re-executed on this GPU, without the training code; each replayed step is
    # stored as a capture of its own (label c<ms>-ops-cuda), the H200's op stream for diff-ops
    echo "== replay --ops of the captures on $gpu" | tee -a "$out/replay_ops_$gpu.txt"
    timeout 300 python3 -m moai_ckpt.cli replay "$run" --ops --device cuda --save-capture 2>&1 |
        tee -a "$out/replay_ops_$gpu.txt"
    timeout 300 python3 -m moai_ckpt.cli replay "$run" --ops --device cuda --json >"$out/replay_ops_$gpu.json" 2>/dev/null
    cli capture "$run" | tee "$out/captures_$gpu.txt"
    for step in 1 3; do
        echo "== diff-ops step $step: the H100 capture (A, the first) vs this GPU's replay of it (B, the newest)" |
            tee -a "$out/diff_ops_$gpu.txt"
        cli diff-ops "$run" "$run" --step "$step" 2>&1 | tee -a "$out/diff_ops_$gpu.txt"
        cli diff-ops "$run" "$run" --step "$step" --json >"$out/diff_ops_step${step}_$gpu.json" 2>/dev/null
    done
    ;;
*)
    echo "mode must be capture or replay" >&2
    exit 2
    ;;
esac
echo "== capture overhead on $gpu (GPT-2 small, bf16 autocast)" | tee "$out/op_capture_$gpu.txt"
timeout 300 python3 benchmarks/op_capture.py --size gpt2-small --batch 8 --device cuda --steps 3 --warmup 3 --reps 2 \
    --json "$out/op_capture_$gpu.json" 2>&1 | tee -a "$out/op_capture_$gpu.txt"
