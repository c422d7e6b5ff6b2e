#!/usr/bin/env bash
# Install everything, lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check moai_ckpt replay parallel tests benchmarks examples
.venv/bin/ruff format --check moai_ckpt replay parallel tests benchmarks examples
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
