#!/usr/bin/env bash
# The whole GPU check of issue 16 in one script, for a session with a lent GPU (one H200: well under
# 10 minutes). Run it first; it prints PASS/FAIL per check and writes JSON + markdown.
#
#   bash bench/gpu_validate.sh                 # GPU: results in bench/results/gpu/
#   bash bench/gpu_validate.sh --dry-run       # CPU: its CPU-safe steps (2-4) at tiny sizes, torch paths, into a temp dir
#   bash bench/gpu_validate.sh --out DIR       # another results folder
#
# Steps (each bounded by a timeout; a failed step is reported, the others still run):
#  1. CUDA tests: the Triton kernels compiled and compared with their torch references (tests/kernels,
#     including the real-shape bf16 cases of test_real_shapes_gpu.py: L=36, H_kv=8, Hq=32, D=128),
#     the FlexAttention training path (tests/training/test_biased_attention.py), and the engine on the
#     GPU at a real width in bf16 (tests/realscale/test_engine_gpu.py).
#  2. Kernel benchmarks: bench/kernels/bench_select_compact.py and bench_decode_attention.py.
#  3. Engine benchmark: bench/bench_engine_gpu.py (Qwen3-VL-8B shape, bf16, 32k context, batch 1 and 4,
#     M=128 vs transformers' full cache).
#  4. bench/gpu_report.py: PASS/FAIL against the targets, summary.json + summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: bash bench/gpu_validate.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-python}
if [ "$dry" = 1 ]; then
  out=${out:-$(mktemp -d)/gpu-dry-run}
  quick="--quick"; engine="--dry-run"; report="--dry-run"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_validate: no CUDA device; use --dry-run to check the script on CPU" >&2
    exit 2
  fi
  out=${out:-bench/results/gpu}
  quick=""; engine=""; report=""
  tests_kernels="tests/kernels"
  tests_flex="tests/training/test_biased_attention.py"
  tests_real="tests/realscale/test_engine_gpu.py"
fi
mkdir -p "$out"
echo "gpu_validate: results in $out"
"$py" -c "import torch, dbtrimkv; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '| dbtrimkv', dbtrimkv.__version__)" \
  | tee "$out/environment.txt"

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$out/$name.rc"
  echo "step $name: exit $rc ($((SECONDS - start)) s)"
}

# 1. CUDA tests (pytest exit 5 = nothing ran); not CPU-safe, so the dry run records them as not run
if [ "$dry" = 1 ]; then
  for name in tests_kernels tests_flex tests_real_shapes; do
    echo "dry run: needs CUDA, not run" > "$out/$name.log"; echo 5 > "$out/$name.rc"
  done
else
  step tests_kernels 180 "$py" -m pytest -q -p no:cacheprovider $tests_kernels
  step tests_flex 120 "$py" -m pytest -q -p no:cacheprovider $tests_flex
  step tests_real_shapes 120 "$py" -m pytest -q -p no:cacheprovider $tests_real
fi
# 2. kernel benchmarks
step bench_select_compact 120 "$py" bench/kernels/bench_select_compact.py $quick --out "$out/select_compact.json"
step bench_decode_attention 120 "$py" bench/kernels/bench_decode_attention.py $quick --out "$out/decode_attention.json"
# 3. engine benchmark
step bench_engine 240 "$py" bench/bench_engine_gpu.py $engine --out "$out/engine_gpu.json"
# 4. PASS / FAIL
"$py" bench/gpu_report.py "$out" $report
