#!/usr/bin/env bash
# Full compile + link check of the CUDA extension on a machine without a GPU:
# builds lazyfast._C with its CUDA kernels against the CUDA build of torch
# (torch==2.14.1, from local disk) in a second venv, then imports it and checks
# that the CUDA kernels were compiled in. Skips (exit 0, with a message) when nvcc
# is missing or free disk is short; set LAZYFAST_REQUIRE_CUDA_LINK=1 to fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LAZYFAST_CUDA_VENV:-.venv-cuda}
NEED_GB=${LAZYFAST_CUDA_LINK_DISK_GB:-8}
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc

skip() {
  echo "cuda-link-check: SKIPPED: $*"
  if [ "${LAZYFAST_REQUIRE_CUDA_LINK:-0}" = 1 ]; then exit 1; fi
  exit 0
}

[ -x "$NVCC" ] || skip "no nvcc at $NVCC"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4/1024/1024)}')
  [ "$free_gb" -ge "$NEED_GB" ] || skip "only ${free_gb} GB free disk, need ${NEED_GB} GB for the CUDA torch venv"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.14.1 ninja "setuptools>=64" wheel numpy
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export LAZYFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
rm -rf build-cuda
"$VENV/bin/python" setup.py -q build_ext --build-lib build-cuda/lib --build-temp build-cuda/tmp
# Import the CUDA build from a copy of the package (CUDA calls would fail without a driver; loading must not).
rm -rf build-cuda/pkg && mkdir -p build-cuda/pkg && cp -r lazyfast build-cuda/pkg/
rm -f build-cuda/pkg/lazyfast/_C*.so
cp build-cuda/lib/lazyfast/_C*.so build-cuda/pkg/lazyfast/
(cd build-cuda/pkg && "../../$VENV/bin/python" - <<'PY'
import torch, lazyfast
info = lazyfast.backend_info()
assert info["cuda_kernels"], info
assert lazyfast.cuda_version() > 0
ops = sorted(n for n in dir(torch.ops.lazyfast) if not n.startswith("_"))
print("cuda-link-check: OK: CUDA extension built, linked and loaded; CUDA", info["cuda"], "; ops:", ops)
PY
)
