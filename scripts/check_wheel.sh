#!/usr/bin/env bash
# The wheel works without the checkout: `moai-ckpt demo` and the default chaos job run from an empty
# directory with moai-ckpt installed from its wheel alone.
#
# 1. build the wheel from a copy of the sources (setuptools writes build/ and *.egg-info beside them);
# 2. make a fresh venv (no pip) whose only way to the dependencies is one .pth line naming .venv's
#    site-packages: that directory is then a plain path entry, so its .pth files (among them the
#    editable install that points at the checkout) are never processed;
# 3. install the wheel into the fresh venv with `pip --target` (which ignores what is installed, so
#    .venv's own moai-ckpt is neither seen as satisfying it nor uninstalled), console script included;
# 4. from an empty directory, with PYTHONPATH unset, check that moai_ckpt comes from the wheel, then
#    run `moai-ckpt demo` and `moai-ckpt chaos run smoke` with quick settings.
#
# Takes about 2 to 3 minutes on 2 CPU cores. Uses .venv's python (or $PYTHON) only to build the wheel
# and to create the fresh venv; it never installs anything into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

mkdir "$work/src" "$work/empty"
git ls-files -z --cached --others --exclude-standard -- pyproject.toml README.md moai_ckpt replay parallel |
    tar --null -cf - -T - | tar -xf - -C "$work/src"
"$PY" -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -q -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/moai_ckpt-*.whl)

"$PY" -m venv --without-pip "$work/venv"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' >"$site/_moai_ckpt_deps.pth"
"$work/venv/bin/python" -m pip install --no-deps --disable-pip-version-check -q --target "$site" "$wheel"
cli="$site/bin/moai-ckpt"  # pip --target puts console scripts under the target, run by the fresh venv's python

cd "$work/empty"
"$work/venv/bin/python" - "$site" <<'EOF'
import sys

import moai_ckpt.tools.gpt

site = sys.argv[1]
assert moai_ckpt.tools.gpt.__file__.startswith(site), f"moai_ckpt comes from {moai_ckpt.tools.gpt.__file__}, not the wheel"
print(f"moai_ckpt {moai_ckpt.__version__} from {site}")
EOF
OMP_NUM_THREADS=1 COLUMNS=120 "$cli" demo --dir demo --steps 12 --ranks 2
OMP_NUM_THREADS=1 COLUMNS=120 "$cli" chaos run smoke --steps 12 --out chaos
test -z "$(ls -A "$work/empty" | grep -v '^demo$\|^chaos$')"  # nothing else was written here
echo "the wheel runs the demo and the default chaos job outside the checkout"
