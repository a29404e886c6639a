#!/usr/bin/env bash
# Device checks for issue #9 (one stream faster), in two parts that each fit one device call:
#   bench/issue9_check.sh single COMMIT  one GPU: kernel and runner GPU tests, bench.kernels (projections: the
#                                        matrix-vector kernel vs cuBLAS; prefill attention vs SDPA), runner step
#                                        times with the kernel off (column-major weights, cuBLAS) and with row-major weights (TRILLM_WEIGHT_LAYOUT=row: the fused GEMV), the cold-start test
#   bench/issue9_check.sh profile COMMIT torch.profiler kernel tables, column-major cuBLAS vs row-major + fused GEMV
#   bench/issue9_check.sh tp COMMIT      two GPUs: bench.all_reduce (IPC one-shot vs NCCL in graphs), the tp tests,
#                                        batch-1 engine ITL at tp=1 and tp=2 (IPC all-reduce on, and off)
# Needs the wheels of .whl/ and the tokenizer copy in .device/tok (see bench/serve_check.sh). Results land in $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/trillm-issue9}"
mkdir -p "$OUT"
export TRILLM_TEST_TOKENIZER=.device/tok
part="$1"
commit="${2:-unknown}"
start=$SECONDS
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env-$part.txt"
STEPS=(python3 -m bench.offline steps --model random:llama2-7b --dtype bfloat16 --batch 1 8 32 --context 1024
       --prefill-len 1024 --decode-steps 40 --repeats 3 --out-dir "$OUT" --git-commit "$commit")
ENGINE=(python3 -m bench.offline engine --model random:llama2-7b --tokenizer .device/tok --dtype bfloat16 --batch 1
        --prompt-len 1024 --output-len 128 --session-len 4096 --out-dir "$OUT" --git-commit "$commit")
case "$part" in
single)
  export CUDA_VISIBLE_DEVICES=0
  timeout 240 python3 -m pytest -m gpu tests/gpu/test_kernels.py tests/gpu/test_runner_cuda.py -p no:cacheprovider -q \
    -x 2>&1 | tail -15 | tee "$OUT/gpu-tests.log"
  timeout 120 python3 -m bench.kernels --only linear,prefill --out-dir "$OUT" --git-commit "$commit" 2>&1 \
    | grep -v '^{' | tail -40 | tee "$OUT/kernels.log"
  timeout 120 "${STEPS[@]}" 2>&1 | tail -7 | tee "$OUT/steps-column-major-cublas.log"
  TRILLM_WEIGHT_LAYOUT=row timeout 120 "${STEPS[@]}" 2>&1 | tail -7 | tee "$OUT/steps-row-major-gemv.log"
  timeout 150 python3 -m pytest -m gpu tests/gpu/test_cold_start.py -p no:cacheprovider -q -s 2>&1 | tail -30 \
    | tee "$OUT/cold-start.log"
  ;;
profile)  # kernel tables of decode batch 1 and the 1k prefill, column-major cuBLAS vs row-major + fused GEMV
  export CUDA_VISIBLE_DEVICES=0
  for layout in column row; do
    TRILLM_WEIGHT_LAYOUT=$layout timeout 150 python3 -m bench.offline steps --model random:llama2-7b --dtype bfloat16 \
      --batch 1 --context 1024 --prefill-len 1024 --decode-steps 20 --repeats 2 --profile --out-dir "$OUT/$layout" \
      --git-commit "$commit" > "$OUT/profile-$layout.log" 2>&1
    tail -5 "$OUT/profile-$layout.log"
  done
  ;;
tp)
  timeout 120 python3 -m bench.all_reduce --world-size 2 --out-dir "$OUT" --git-commit "$commit" 2>&1 | tail -12 \
    | tee "$OUT/all-reduce.log"
  timeout 240 python3 -m pytest -m gpu tests/gpu/test_tensor_parallel_cuda.py -p no:cacheprovider -q 2>&1 | tail -8 \
    | tee "$OUT/tp-tests.log"
  for tp in 1 2; do
    timeout 120 "${ENGINE[@]}" --tp $tp 2>&1 | tail -4 | tee "$OUT/engine-tp$tp.log"
  done
  TRILLM_CUSTOM_ALL_REDUCE=0 timeout 120 "${ENGINE[@]}" --tp 2 2>&1 | tail -4 | tee "$OUT/engine-tp2-nccl.log"
  ;;
esac
echo "part $part done in $((SECONDS - start)) s"
