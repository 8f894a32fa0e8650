#!/usr/bin/env bash
# GPU check, unattended, in one call on the GPU machine (torch preinstalled, no network):
#   bash scripts/gpu_check.sh [OUTDIR]      (default: $OUT, else benchmarks/results/gpu-latest)
# 1. builds lazyfast._C with its CUDA kernels (pip -e, no build isolation, no deps);
# 2. runs every CUDA test (pytest -m cuda): streams, second device, CUDA == CPU in float64,
#    TF32 off by default, large grids, and the CUDA versions of the op tests;
# 3. runs the GPU benchmarks at n = 16384 (two-layer Gram float32/float64 with the dense cuBLAS
#    formulation as first baseline, TF32-mode error; MLP eNTK), each against the cuBLAS GEMM rate
#    measured in the same run at the same precision;
# 4. runs compute-sanitizer memcheck on one small CUDA test;
# 5. writes gpu_results.json + gpu_results.md (GPU named) from what the stages wrote.
# Every stage has a time limit inside a total budget (LAZYFAST_GPU_BUDGET_S, default 560 s), so
# the whole script ends within 10 minutes; each stage's log lands in OUTDIR even if a later one fails.
# At most 8 files come back from the GPU machine: machine.txt, build.log, cuda_tests.log,
# memcheck.log, two_layer_gpu.json, mlp_gpu.json, gpu_results.json, gpu_results.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-benchmarks/results/gpu-latest}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${LAZYFAST_GPU_BUDGET_S:-560}
T0=$(date +%s)
status=0

# limit SECONDS: min(SECONDS, what is left of the budget), at least 10.
limit() { local left=$(( BUDGET - ($(date +%s) - T0) )); local l=$1; [ "$left" -lt "$l" ] && l=$left; [ "$l" -lt 10 ] && l=10; echo "$l"; }
stage() { echo "== $1 ($(( $(date +%s) - T0 )) s elapsed)"; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1;
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'devices', torch.cuda.device_count())";
  echo "cores $(nproc)"; git rev-parse --short HEAD 2>/dev/null; } > "$OUTDIR/machine.txt" 2>&1
cat "$OUTDIR/machine.txt"

stage build
if ! timeout "$(limit 240)" env TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LAZYFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
     $PY -m pip install --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1; then
  tail -40 "$OUTDIR/build.log"; echo "BUILD FAILED"; build_ok=0; status=1
else
  build_ok=1
fi
echo "build: $(( $(date +%s) - T0 )) s"

if [ "$build_ok" = 1 ]; then
  $PY -c "import lazyfast, json; print(json.dumps(lazyfast.backend_info()))" >> "$OUTDIR/machine.txt" 2>&1

  stage "CUDA tests"
  timeout "$(limit 200)" $PY -m pytest -q -m cuda tests -p no:cacheprovider -o addopts="" --durations=10 \
    > "$OUTDIR/cuda_tests.log" 2>&1 || status=1
  tail -15 "$OUTDIR/cuda_tests.log"

  stage "two-layer GPU benchmark"
  timeout "$(limit 150)" $PY benchmarks/bench_two_layer_gpu.py --out "$OUTDIR" > "$OUTDIR/bench.log" 2>&1 || status=1
  stage "MLP GPU benchmark"
  timeout "$(limit 120)" $PY benchmarks/bench_mlp_gpu.py --out "$OUTDIR" >> "$OUTDIR/bench.log" 2>&1 || status=1
  tail -30 "$OUTDIR/bench.log"
  # bench.log is folded into cuda_tests.log (8-file limit).
  { echo; echo "==== benchmarks"; cat "$OUTDIR/bench.log"; } >> "$OUTDIR/cuda_tests.log"; rm -f "$OUTDIR/bench.log"

  stage "compute-sanitizer memcheck"
  if command -v compute-sanitizer > /dev/null 2>&1 || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    timeout "$(limit 150)" "$CS" --tool memcheck --error-exitcode 9 \
      $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda_driver.py -k "float64_equals_cpu" \
      > "$OUTDIR/memcheck.log" 2>&1
    echo "memcheck exit code: $?" >> "$OUTDIR/memcheck.log"
  else
    echo "compute-sanitizer not found" > "$OUTDIR/memcheck.log"
  fi
  tail -5 "$OUTDIR/memcheck.log"
fi

stage summary
$PY - "$OUTDIR" "$status" <<'PY' || status=1
# gpu_results.json + gpu_results.md from the stage outputs (GPU named, rates vs cuBLAS).
import json, os, re, sys
out, status = sys.argv[1], int(sys.argv[2])
def read(name):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return ""
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
machine = read("machine.txt").strip().splitlines()
tests = read("cuda_tests.log")
summary = [l for l in tests.splitlines() if re.search(r"(passed|failed|error)", l) and " in " in l]
mem = read("memcheck.log")
mem_line = [l for l in mem.splitlines() if "ERROR SUMMARY" in l or "exit code" in l or "not found" in l]
tl, mlp = load("two_layer_gpu.json"), load("mlp_gpu.json")
gpu = (tl or mlp or {}).get("gpu", machine[1] if len(machine) > 1 else "unknown GPU")
res = dict(gpu=gpu, machine=machine, cuda_tests=summary[-1] if summary else "no summary (see cuda_tests.log)",
           memcheck=mem_line, two_layer=tl, mlp=mlp, status=status)
with open(os.path.join(out, "gpu_results.json"), "w") as f:
    json.dump(res, f, indent=1)
md = [f"# lazyfast GPU check on {gpu}", "", "Written by `scripts/gpu_check.sh`.", "", "```"] + machine + ["```", "",
      f"CUDA tests: {res['cuda_tests']}", "", "compute-sanitizer memcheck: " + ("; ".join(mem_line) or "not run"), ""]
for name, r in (("Two-layer Gram (n = 16384, d = 100, m = 16384, k = 1, ReLU)", tl), ("MLP eNTK", mlp)):
    if not r:
        md += [f"## {name}", "", "not run / failed (see cuda_tests.log)", ""]
        continue
    md += [f"## {name}", "", f"{r['date']}, commit {r['commit']}, torch {r['torch']} (CUDA {r['cuda']}).", "",
           "| precision | method | case | time s | TFLOP/s | fraction of cuBLAS GEMM | speed-up vs dense | error |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for block in r["results"]:
        md.append(f"| {block['precision']} | cuBLAS GEMM 8192^3 | | | {block['gemm_tflops']:.1f} | 1.00 | | |")
        for row in block["rows"]:
            err = row.get("rel_err", row.get("rel_err_vs_dense"))
            md.append(f"| {row.get('precision', block['precision'])} | {row['method']} | {row.get('case', '')} | "
                      f"{row['time_s']:.4f} | {row['tflops']:.1f} | {row['frac_gemm']:.2f} | "
                      f"{row.get('speedup_vs_dense', float('nan')):.2f} | "
                      + (f"{err:.1e}" if err is not None else "") + " |")
    md.append("")
with open(os.path.join(out, "gpu_results.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md))
PY
echo "total: $(( $(date +%s) - T0 )) s, status $status"
exit $status
