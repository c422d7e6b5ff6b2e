#!/usr/bin/env bash
# Install everything, lint, type-check, build the docs site (strict), check the wheel outside the
# checkout and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check moai_ckpt replay parallel tests benchmarks examples
.venv/bin/ruff format --check moai_ckpt replay parallel tests benchmarks examples
.venv/bin/mypy
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$(mktemp -d)"
bash scripts/check_wheel.sh  # the wheel runs `moai-ckpt demo` and the chaos smoke job outside the checkout
.venv/bin/python -m pytest "$@"
