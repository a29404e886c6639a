#!/usr/bin/env bash
# Serving checks on the lent GPU machine (issue #8), in two parts so each stays inside one device call:
#   bench/serve_check.sh engine COMMIT   GPU tests of the sampler and runner, runner step times (no speed lost), and
#                                        bench/host_path.py: engine alone vs HTTP at 32/128/256 streams (tp=1)
#   bench/serve_check.sh serve COMMIT    `trillm serve` driven by bench/serve.py: ShareGPT-like mix (tp=1, and with
#                                        --max-prefill-token-num 2048), Poisson 8 req/s, one stream of 1k/128,
#                                        a shared 1k prefix with prefix caching off and on, and tp=2 on two GPUs
#   bench/serve_check.sh quick COMMIT    one server: c1, the ShareGPT-like mix, the shared prefix
#   bench/serve_check.sh prefix-ab COMMIT the ShareGPT-like mix (no shared prefixes) with prefix caching off and on:
#                                        what caching costs where it cannot help
# Needs the wheels of .whl/ (trio, quart, hypercorn, cattrs, msgspec, ...) and a tokenizer-only copy of the default
# model in .device/tok (random presets have no tokenizer). Everything lands in $OUT; a table per part comes last.
set -uo pipefail
OUT="${OUT:-/tmp/trillm-serve-check}"
mkdir -p "$OUT"
part="$1"
commit="${2:-unknown}"
start=$SECONDS
source bench/device_env.sh
read -r -a MODEL <<<"${MODEL_ARGS:-random:llama2-7b --tokenizer .device/tok --dtype bfloat16 --session-len 4096}"
N="${NUM_PROMPTS:-1000}"  # ShareGPT-like requests (a CPU smoke run of this script sets a handful)

serve_up() {  # serve_up LOGNAME EXTRA-FLAGS...: start trillm serve in the background, wait for /health
  local name=$1; shift
  python3 -m trillm serve api_server "${MODEL[@]}" --server-name 127.0.0.1 --server-port 23333 --log-level warning \
    "$@" >"$OUT/$name.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 240); do
    curl -sf http://127.0.0.1:23333/health >/dev/null && return 0
    kill -0 $SERVER_PID 2>/dev/null || { echo "server $name died"; tail -20 "$OUT/$name.log"; return 1; }
    sleep 0.5
  done
  echo "server $name did not come up"; return 1
}
serve_down() { kill -INT $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null; }
bench() {  # bench LABEL ARGS...: one bench/serve.py run, JSON in $OUT/serve-LABEL.json
  local label=$1; shift
  timeout 240 python3 -m bench.serve --base-url http://127.0.0.1:23333 --no-progress --label "$label" \
    --result-file "$OUT/serve-$label.json" "$@" 2>&1 | tail -14 | tee -a "$OUT/serve.log"
}

case "$part" in
engine)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
  timeout 200 python3 -m pytest -m gpu tests/gpu/test_sampling.py tests/gpu/test_sampling_sync.py \
    tests/gpu/test_runner_cuda.py -p no:cacheprovider -q 2>&1 | tail -5 | tee "$OUT/gpu-tests.log"
  timeout 150 python3 -m bench.offline steps --model random:llama2-7b --dtype bfloat16 --batch 1 32 --context 1024 \
    --prefill-len 1024 --decode-steps 40 --repeats 3 --out-dir "$OUT" --git-commit "$commit" 2>&1 | tail -8 \
    | tee "$OUT/steps.log"
  timeout 300 python3 -m bench.host_path --model random:llama2-7b --tokenizer .device/tok --real-rank \
    --streams 32 128 256 --input-len 256 --output-len 256 --out-dir "$OUT" 2>&1 | grep -v " INFO \|^\[" \
    | tail -8 | tee "$OUT/host-path.log"
  ;;
serve)
  export CUDA_VISIBLE_DEVICES=0
  serve_up tp1 && {
    bench c1 --dataset random --input-len 1024 --output-len 128 --num-prompts 16 --max-concurrency 1
    bench sharegpt-tp1 --dataset sharegpt-like --num-prompts "$N" --max-concurrency 256
    bench poisson8 --dataset sharegpt-like --num-prompts "$((N / 4))" --request-rate 8 --seed 1
    bench prefix-on --dataset shared-prefix --prefix-len 1024 --suffix-len 32 --output-len 16 --num-prompts 48 \
      --max-concurrency 48
    serve_down; }
  serve_up prefix-off --disable-prefix-caching && {
    bench prefix-off --dataset shared-prefix --prefix-len 1024 --suffix-len 32 --output-len 16 --num-prompts 48 \
      --max-concurrency 48
    serve_down; }
  serve_up chunk2048 --max-prefill-token-num 2048 && {
    bench sharegpt-tp1-chunk2048 --dataset sharegpt-like --num-prompts "$N" --max-concurrency 256
    serve_down; }
  export CUDA_VISIBLE_DEVICES=0,1
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    serve_up tp2 --tp 2 && {
      bench sharegpt-tp2 --dataset sharegpt-like --num-prompts "$N" --max-concurrency 256
      bench c1-tp2 --dataset random --input-len 1024 --output-len 128 --num-prompts 16 --max-concurrency 1
      serve_down; }
  fi
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = [("run", "done", "failed", "out tok/s", "TTFT p50", "TPOT p50", "TPOT p99", "ITL p50", "cached")]
for path in sorted(pathlib.Path(sys.argv[1]).glob("serve-*.json")):
    r = json.loads(path.read_text())["results"]
    f = lambda k: f"{r[k]:.1f}" if r.get(k) is not None else "-"
    rows.append((path.stem[6:], r["completed"], r["failed"], f"{r['output_tok_per_s']:.0f}", f("median_ttft_ms"),
                 f("median_tpot_ms"), f("p99_tpot_ms"), f("median_itl_ms"), f("cached_fraction")))
widths = [max(len(str(x[i])) for x in rows) for i in range(len(rows[0]))]
for row in rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
PY
  ;;
quick)  # one server: one stream of 1k/128, the ShareGPT-like mix, the shared prefix (caching on)
  export CUDA_VISIBLE_DEVICES=0
  serve_up tp1 && {
    bench c1 --dataset random --input-len 1024 --output-len 128 --num-prompts 16 --max-concurrency 1
    bench sharegpt-tp1 --dataset sharegpt-like --num-prompts "$N" --max-concurrency 256
    bench prefix-on --dataset shared-prefix --prefix-len 1024 --suffix-len 32 --output-len 16 --num-prompts 48 \
      --max-concurrency 48
    serve_down; }
  ;;
prefix)  # the shared-prefix pair alone
  export CUDA_VISIBLE_DEVICES=0
  for mode in on off; do
    flag=(); [ "$mode" = off ] && flag=(--disable-prefix-caching)
    serve_up "prefix-$mode" "${flag[@]}" && {
      bench "prefix-$mode" --dataset shared-prefix --prefix-len 1024 --suffix-len 32 --output-len 16 --num-prompts 48 \
        --max-concurrency 48
      serve_down; }
  done
  ;;
prefix-ab)
  export CUDA_VISIBLE_DEVICES=0
  serve_up ab-off --disable-prefix-caching && { bench sharegpt-caching-off --dataset sharegpt-like --num-prompts "$N" --max-concurrency 256
                       serve_down; }
  serve_up ab-on && {
    bench sharegpt-caching-on --dataset sharegpt-like --num-prompts "$N" --max-concurrency 256
    serve_down; }
  ;;
esac
echo "part $part done in $((SECONDS - start)) s"
