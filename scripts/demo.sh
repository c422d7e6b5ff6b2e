#!/usr/bin/env bash
# Install moai-ckpt and run its demo: a small GPT trained under torchrun on 2 CPU ranks, one rank
# SIGKILLed mid-step, torchrun restarting the job, and the recovered run compared bitwise with an
# uninterrupted one. Arguments go to `moai-ckpt demo` (--dir, --steps, --seed, --ranks, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moai-ckpt demo "$@"
