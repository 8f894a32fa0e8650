#!/usr/bin/env bash
# Packaging check (part of `make test`): the sdist builds into a wheel on its own, and the wheel
# installs and works outside the source tree.
#   1. python -m build --sdist --no-isolation       -> dist/lazyfast-V.tar.gz
#   2. extract it in a temporary directory, build a wheel FROM THE EXTRACTED SDIST
#      (--no-isolation: compiled against the project venv's torch)
#   3. create a fresh venv that sees the project venv's packages through a .pth line (so torch
#      is not reinstalled), pip install the wheel (non-editable, --no-index: every declared
#      runtime dependency must already be satisfied), import lazyfast from outside the source
#      tree, check lazyfast._C loaded from the fresh venv, and compare a tiny eNTK with the
#      brute-force oracle.
# Usage: scripts/package_check.sh [PYTHON]   (default .venv/bin/python)
# The wheel is built without CUDA kernels unless LAZYFAST_CUDA=1|auto is set (CPU kernels suffice to
# check the packaging; the CUDA build is checked by cuda_link_check.sh and gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${1:-${PY:-.venv/bin/python}}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lazyfast-pkg.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
step() { echo "package-check: [$(( $(date +%s) - t0 )) s] $*"; }

"$PY" -c "import build" 2>/dev/null || "$PY" -m pip install -q build

step "sdist"
"$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" . > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/lazyfast-*.tar.gz)
# What a build needs must be in it; what a build makes must not.
tar -tzf "$SDIST" > "$WORK/sdist.txt"
for f in LICENSE README.md CMakeLists.txt pyproject.toml setup.py csrc/checks.h csrc/two_layer_aten.h \
         csrc/include/lazyfast/common.h csrc/cuda/two_layer_kernels.cu csrc/tests/test_math.cpp lazyfast/_version.py; do
  grep -qx "lazyfast-[^/]*/$f" "$WORK/sdist.txt" || { echo "package-check: FAIL: $f missing from $(basename "$SDIST")"; exit 1; }
done
if grep -E '\.so$|_build_config\.py$' "$WORK/sdist.txt"; then echo "package-check: FAIL: build products in the sdist"; exit 1; fi

step "wheel from the extracted sdist"
mkdir "$WORK/src" && tar -xzf "$SDIST" -C "$WORK/src"
SRC=$(ls -d "$WORK"/src/lazyfast-*)
(cd "$SRC" && MAX_JOBS=${MAX_JOBS:-2} LAZYFAST_CUDA=${LAZYFAST_CUDA:-0} "$PY" -m build --wheel --no-isolation \
   --outdir "$WORK/dist" . > "$WORK/wheel.log" 2>&1) || { tail -40 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/lazyfast-*.whl)
"$PY" -c "import sys, zipfile; n = zipfile.ZipFile(sys.argv[1]).namelist(); sys.exit(not any(x.startswith('lazyfast/_C') for x in n) or 'lazyfast/_build_config.py' not in n)" "$WHEEL" || { echo "package-check: FAIL: no lazyfast/_C or lazyfast/_build_config.py in $(basename "$WHEEL")"; exit 1; }

step "fresh venv + non-editable install of $(basename "$WHEEL")"
"$PY" -m venv --without-pip "$WORK/venv"
FRESH_SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PARENT_SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PARENT_SITE" > "$FRESH_SITE/_lazyfast_parent_site.pth"   # a plain path: its own .pth files (an editable lazyfast) are not run
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-index "$WHEEL" 2>&1 | grep -v "^$" || true
"$PY" -m pip --python "$WORK/venv/bin/python" show -q lazyfast > /dev/null

step "import outside the source tree + smoke test"
(cd "$WORK" && env -u PYTHONPATH LAZYFAST_REQUIRE_COMPILED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$WORK/venv/bin/python" - "$ROOT" "$FRESH_SITE" <<'PY'
import os, sys
root, fresh_site = sys.argv[1], os.path.realpath(sys.argv[2])
import torch, lazyfast
from lazyfast import _ext, reference
here = os.path.realpath(lazyfast.__file__)
assert here.startswith(fresh_site + os.sep), f"lazyfast imported from {here}, not from the installed wheel in {fresh_site}"
assert not here.startswith(os.path.realpath(root) + os.sep), here
assert _ext._C is not None and os.path.realpath(_ext._C.__file__).startswith(fresh_site), _ext._LOAD_ERROR
info = lazyfast.backend_info()
assert info["cpu_kernels"] and info["built_with_torch"] == torch.__version__, info
torch.manual_seed(0)
x = torch.randn(6, 3, dtype=torch.float64)
for model in (lazyfast.TwoLayer(3, 16, 2, dtype=torch.float64), lazyfast.MLP(3, [8, 8], 1, dtype=torch.float64)):
    K = lazyfast.empirical_ntk(model, x, mode="full")
    err = float((K.detach() - reference.ntk_oracle(model, x, mode="full").detach()).abs().max())
    assert err < 1e-10, (type(model).__name__, err)
from importlib.metadata import version, requires
assert version("lazyfast") == lazyfast.__version__
print(f"package-check: OK: lazyfast {lazyfast.__version__} from {os.path.dirname(here)}, _C built with torch "
      f"{info['built_with_torch']}, eNTK == oracle (TwoLayer, MLP); requires {requires('lazyfast')}")
PY
)
step "done"
