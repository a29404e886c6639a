#!/usr/bin/env bash
# Device checks for issue #17 (tensor parallelism at 4 and 8 GPUs, a 70B-shaped model), one part per device call:
#   bench/tp_check.sh tp2 COMMIT   nvidia-h100-x2: bench.all_reduce at 2 ranks, the tp GPU tests that fit 2 GPUs, the
#                                  IPC kernel tests on one GPU (one and two shot, staged peers), batch-1 engine ITL of
#                                  llama2-7b at tp=1 and tp=2
#   bench/tp_check.sh tp4 COMMIT   nvidia-h100-x4: bench.all_reduce at 4 ranks (one shot, two shot, NCCL), every tp
#                                  GPU test that fits 4 GPUs (tp=4 vs tp=1 float32 on tiny-tp8 and llama3-8b), engine
#                                  batch 1 and 64 of llama2-7b at tp=4 and of llama3-70b at tp=4 (35 GB a GPU), start
#   bench/tp_check.sh tp8 COMMIT   nvidia-h100-x8: bench.all_reduce at 8 ranks, all tp GPU tests (the 70B bf16 tp=4 vs
#                                  tp=8 64-token test included), engine batch 1 and 64 of llama2-70b and llama3-70b at
#                                  tp=8 (batch-1 ITL against the 5.9 ms weight-read floor), IPC all-reduce on and off
#   bench/tp_check.sh serve8 COMMIT nvidia-h100-x8: `trillm serve --tp 8` on random:llama3-70b driven by bench/serve.py
#                                  (ShareGPT-like mix, one 1k/128 stream), with the server's start time (model load)
# Needs the wheels of .whl/ and the tokenizer copy in .device/tok (see bench/serve_check.sh). Results land in $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/trillm-tp-check}"
mkdir -p "$OUT"
export TRILLM_TEST_TOKENIZER=.device/tok
part="$1"
commit="${2:-unknown}"
start=$SECONDS
source bench/device_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env-$part.txt"
gpus=$(nvidia-smi -L | wc -l)
engine() {  # engine LABEL MODEL TP [BATCH...]: bench.offline engine, 1k prompts, 128 output tokens
  local label=$1 model=$2 tp=$3; shift 3
  timeout 480 python3 -m bench.offline engine --model "$model" --tokenizer .device/tok --dtype bfloat16 --tp "$tp" \
    --batch "${@:-1}" --prompt-len 1024 --output-len 128 --session-len 2048 --out-dir "$OUT" --git-commit "$commit" \
    2>&1 | tail -5 | tee "$OUT/engine-$label.log"
}
all_reduce() {
  timeout 240 python3 -m bench.all_reduce --world-size "$1" --out-dir "$OUT" --git-commit "$commit" 2>&1 | tail -14 \
    | tee "$OUT/all-reduce-$1.log"
}
tp_tests() {  # tp_tests TIMEOUT [-k EXPR]: the tensor-parallel GPU tests (each skips where there are too few GPUs)
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -m gpu tests/gpu/test_tensor_parallel_cuda.py \
    tests/gpu/test_tensor_parallel_all_reduce.py -p no:cacheprovider -q -rs "$@" 2>&1 | tail -15 \
    | tee -a "$OUT/tp-tests-$part.log"
}

case "$part" in
tp2)
  [ "$gpus" -ge 2 ] || { echo "needs 2 GPUs, found $gpus"; exit 1; }
  all_reduce 2
  tp_tests 420
  for tp in 1 2; do engine "llama2-7b-tp$tp" random:llama2-7b $tp 1; done
  ;;
tp4)
  [ "$gpus" -ge 4 ] || { echo "needs 4 GPUs, found $gpus"; exit 1; }
  all_reduce 4
  tp_tests 480 -k "not 70b"
  engine llama2-7b-tp4 random:llama2-7b 4 1 64
  engine llama3-70b-tp4 random:llama3-70b 4 1 64
  ;;
tp8)
  [ "$gpus" -ge 8 ] || { echo "needs 8 GPUs, found $gpus"; exit 1; }
  all_reduce 8
  tp_tests 540
  engine llama2-70b-tp8 random:llama2-70b 8 1 64
  engine llama3-70b-tp8 random:llama3-70b 8 1 64
  TRILLM_CUSTOM_ALL_REDUCE=0 engine llama3-70b-tp8-nccl random:llama3-70b 8 1
  ;;
serve8)
  [ "$gpus" -ge 8 ] || { echo "needs 8 GPUs, found $gpus"; exit 1; }
  t0=$SECONDS
  python3 -m trillm serve api_server random:llama3-70b --tokenizer .device/tok --dtype bfloat16 --session-len 4096 \
    --tp 8 --server-name 127.0.0.1 --server-port 23333 --log-level warning >"$OUT/serve8.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    curl -sf http://127.0.0.1:23333/health >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server died"; tail -20 "$OUT/serve8.log"; exit 1; }
    sleep 0.5
  done
  echo "server up in $((SECONDS - t0)) s (model load, graphs, warm-up)" | tee "$OUT/serve8-start.txt"
  for run in "c1 --dataset random --input-len 1024 --output-len 128 --num-prompts 16 --max-concurrency 1" \
             "sharegpt-tp8 --dataset sharegpt-like --num-prompts ${NUM_PROMPTS:-1000} --max-concurrency 256"; do
    read -r -a words <<<"$run"
    timeout 300 python3 -m bench.serve --base-url http://127.0.0.1:23333 --no-progress --label "${words[0]}" \
      --result-file "$OUT/serve-${words[0]}.json" "${words[@]:1}" 2>&1 | tail -14 | tee -a "$OUT/serve.log"
  done
  kill -INT $pid; wait $pid
  ;;
*)
  echo "usage: bench/tp_check.sh tp2|tp4|tp8|serve8 COMMIT"; exit 2
  ;;
esac
echo "part $part done in $((SECONDS - start)) s"
