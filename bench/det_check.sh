#!/usr/bin/env bash
# Deterministic mode (issue #16) on the lent GPU machine, in parts that each fit one device call:
#   bench/det_check.sh kernels COMMIT  GPU kernel tests (bitwise batch invariance at real sizes), bench.deterministic
#                                      (det_linear / det attention vs cuBLAS and the ordinary kernels), runner step
#                                      times with and without --deterministic (decode b1/b32 at 1k, prefill 1k)
#   bench/det_check.sh engine COMMIT   tests/actors/test_engine_deterministic.py (64 requests alone, batched, prefix
#                                      cache on/off, preempted: bitwise equal; the control without the mode), and
#                                      bench.offline engine throughput with and without the mode
#   bench/det_check.sh serve COMMIT    `trillm serve` with and without --deterministic: ShareGPT-like mix and c1
# Needs the wheels of .whl/ and the tokenizer copy in .device/tok (as bench/serve_check.sh). Results land in $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/trillm-det-check}"
mkdir -p "$OUT"
part="$1"
commit="${2:-unknown}"
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env-$part.txt"
case "$part" in
kernels)
  timeout 240 python3 -m pytest -m gpu tests/gpu/test_deterministic_kernels.py -p no:cacheprovider -q 2>&1 | tail -15 \
    | tee "$OUT/det-kernel-tests.log"
  timeout 200 python3 -m bench.deterministic --out-dir "$OUT" ${GEMM_CONFIGS:+--gemm-configs $GEMM_CONFIGS} 2>&1 \
    | tail -45 | tee "$OUT/det-kernels.log"
  for flag in "" --deterministic; do
    timeout 150 python3 -m bench.offline steps --model random:llama2-7b --dtype bfloat16 --batch 1 32 \
      --context 1024 --prefill-len 1024 --decode-steps 40 --repeats 3 --out-dir "$OUT" --git-commit "$commit" $flag \
      2>&1 | tail -8 | tee -a "$OUT/det-steps.log"
  done
  ;;
engine)
  TRILLM_TEST_TOKENIZER=.device/tok timeout 420 python3 -m pytest -m gpu tests/actors/test_engine_deterministic.py \
    -p no:cacheprovider -q -s 2>&1 | grep -v " INFO " | tail -40 | tee "$OUT/det-engine-test.log"
  for flag in "" --deterministic; do
    timeout 150 python3 -m bench.offline engine --model random:llama2-7b --tokenizer .device/tok --dtype bfloat16 \
      --batch 1 64 256 --prompt-len 256 --output-len 256 --session-len 4096 --out-dir "$OUT" --git-commit "$commit" \
      $flag 2>&1 | grep -v " INFO " | tail -8 | tee -a "$OUT/det-engine-throughput.log"
  done
  ;;
serve)
  read -r -a MODEL <<<"random:llama2-7b --tokenizer .device/tok --dtype bfloat16 --session-len 4096"
  N="${NUM_PROMPTS:-1000}"
  for flag in "" --deterministic; do
    label=$([ -n "$flag" ] && echo det || echo base)
    python3 -m trillm serve api_server "${MODEL[@]}" --server-name 127.0.0.1 --server-port 23333 \
      --log-level warning $flag >"$OUT/serve-$label.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do curl -sf http://127.0.0.1:23333/health >/dev/null && break; sleep 0.5; done
    timeout 100 python3 -m bench.serve --base-url http://127.0.0.1:23333 --no-progress --label "c1-$label" \
      --result-file "$OUT/serve-c1-$label.json" --dataset random --input-len 1024 --output-len 128 --num-prompts 16 \
      --max-concurrency 1 2>&1 | tail -14 | tee -a "$OUT/det-serve.log"
    timeout 200 python3 -m bench.serve --base-url http://127.0.0.1:23333 --no-progress --label "sharegpt-$label" \
      --result-file "$OUT/serve-sharegpt-$label.json" --dataset sharegpt-like --num-prompts "$N" \
      --max-concurrency 256 2>&1 | tail -14 | tee -a "$OUT/det-serve.log"
    kill -INT $pid; wait $pid
  done
  ;;
esac
