#!/usr/bin/env bash
# GPU check, run on the GPU machine (torch preinstalled, no network):
#   bash scripts/gpu_check.sh [OUTDIR]      (default: $OUT, else benchmarks/results/gpu-latest)
# 1. builds lazyfast._C with its CUDA kernels (no build isolation, no deps);
# 2. runs every CUDA test (pytest -m cuda);
# 3. runs the GPU benchmarks (benchmarks/bench_*_gpu.py) and writes their JSON;
# 4. writes a Markdown summary. Each stage's log lands in OUTDIR even if a later stage fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/results/gpu-latest}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1;
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; nproc; } > "$OUTDIR/machine.txt" 2>&1
cat "$OUTDIR/machine.txt"

echo "== build"
t0=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LAZYFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
     $PY setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1; then
  tail -40 "$OUTDIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
$PY -m lazyfast.cli info --json | tee "$OUTDIR/backend.json"

echo "== CUDA tests"
$PY -m pytest -q -m cuda tests -p no:cacheprovider -o addopts="" --junitxml="$OUTDIR/cuda_tests.xml" \
  > "$OUTDIR/cuda_tests.log" 2>&1 || status=1
tail -15 "$OUTDIR/cuda_tests.log"

echo "== GPU benchmarks"
benches=$(ls benchmarks/bench_*_gpu.py 2>/dev/null || true)
if [ -n "$benches" ]; then
  $PY -m pytest -q $benches -p no:cacheprovider --benchmark-json="$OUTDIR/bench_gpu.json" \
    --benchmark-columns=min,median,mean,rounds > "$OUTDIR/bench_gpu.log" 2>&1 || status=1
  tail -40 "$OUTDIR/bench_gpu.log"
fi
exit $status
