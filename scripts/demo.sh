#!/usr/bin/env bash
# Install moai-ckpt and run the quickstart: train, snapshot, restore into fresh objects, continue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py --dir "${1:-runs/quickstart}"
