#!/usr/bin/env bash
# One device call for the kernel work: environment facts, the kernel tests, then the kernel benchmark.
# Run on the lent GPU machine from the repository root:  bench/gpu_kernels_check.sh [git-commit]
# Everything lands in $OUT: env.txt, kernel-tests.log, bench.log and <gpu>-kernels-<date>.json.
set -uo pipefail
OUT="${OUT:-/tmp/trillm-kernels-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
commit="${1:-unknown}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, cupy; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda);
print('cupy', cupy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion()); print(torch.cuda.get_device_properties(0))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout "${TEST_TIMEOUT_S:-300}" python3 -m pytest tests/gpu/test_kernels.py -q -p no:cacheprovider --durations=10 \
  2>&1 | tee "$OUT/kernel-tests.log"
tests_rc=$?

timeout "${BENCH_TIMEOUT_S:-240}" python3 -m bench.kernels --device cuda --out-dir "$OUT" --git-commit "$commit" \
  2>&1 | tee "$OUT/bench.log"
bench_rc=$?

echo "kernel tests rc=$tests_rc, bench rc=$bench_rc"
exit $((tests_rc != 0 || bench_rc != 0))
