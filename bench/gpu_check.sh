#!/usr/bin/env bash
# One device call for the CUDA runner: environment facts, the GPU tests, then runner step times with CUDA graphs on
# and off (random:llama2-7b, bf16: prefill of 1,024 tokens, decode at batch 1 and 32 with 1k context), table last.
# Run on the lent GPU machine from the repository root:  bench/gpu_check.sh [git-commit]
# Installs nothing: the machine has torch, cupy, transformers, safetensors, numpy, attrs and pytest; the GPU tests
# and bench/offline.py's `steps` mode import none of trio, quart or cattrs (pytest-trio is absent: `-p no:trio`, and
# pyproject's trio_mode then only warns).
# Everything lands in $OUT: env.txt, gpu-tests.log, bench.log, <gpu>-offline-steps-{graphs,eager}-<date>.json and
# <gpu>-offline-profile-{graphs,eager}-<date>.txt (torch.profiler kernel tables of 5 decode steps per batch size).
set -uo pipefail
OUT="${OUT:-/tmp/trillm-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
commit="${1:-unknown}"
start=$SECONDS

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, cupy, transformers; print(sys.version); print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cupy', cupy.__version__, 'transformers', transformers.__version__);
print(torch.cuda.get_device_properties(0))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout "${TEST_TIMEOUT_S:-270}" python3 -m pytest -m gpu tests/gpu tests/models -p no:trio -p no:cacheprovider \
  -q -s --durations=12 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=$?
echo "== tests rc=$tests_rc after $((SECONDS - start)) s"

steps=(steps --model random:llama2-7b --dtype bfloat16 --batch 1 32 --context 1024 --prefill-len 1024
       --decode-steps 40 --out-dir "$OUT" --git-commit "$commit")
timeout "${BENCH_TIMEOUT_S:-150}" python3 -m bench.offline "${steps[@]}" --profile 2>&1 | tee "$OUT/bench.log"
graphs_rc=$?
timeout "${BENCH_TIMEOUT_S:-150}" python3 -m bench.offline "${steps[@]}" --profile --no-cuda-graph 2>&1 \
  | tee -a "$OUT/bench.log"
eager_rc=$?
for blas in ${BLAS_VARIANTS:-}; do  # e.g. BLAS_VARIANTS=cublaslt: graphs again with another GEMM library, no profile
  timeout "${BENCH_TIMEOUT_S:-150}" python3 -m bench.offline "${steps[@]}" --blas "$blas" 2>&1 \
    | tee -a "$OUT/bench.log" || graphs_rc=1
done
echo "== bench rc=$graphs_rc/$eager_rc after $((SECONDS - start)) s"

# Through the Trio engine and a rank process (needs trio: carried as wheels in .whl/, see the device notes), with
# step overlap on and off. Random presets use the default model's tokenizer: a tokenizer-only copy in .device/tok.
engine_rc=0
if python3 -c "import trio" 2>/dev/null && [ -f .device/tok/tokenizer.json ]; then
  engine=(engine --model random:llama2-7b --dtype bfloat16 --tokenizer .device/tok --batch 1 32 --prompt-len 1024
          --output-len 128 --session-len 4096 --out-dir "$OUT" --git-commit "$commit")
  for mode in "" "--no-overlap"; do
    timeout "${BENCH_TIMEOUT_S:-150}" python3 -m bench.offline "${engine[@]}" $mode 2>&1 | grep -v " INFO " \
      | tee -a "$OUT/bench.log" || engine_rc=1
  done
else
  echo "== engine bench skipped: no trio or no .device/tok"
fi

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*-offline-steps-*.json")):
    data = json.loads(path.read_text())
    mode = ("graphs" if data["cuda_graphs"] else "eager") + ("" if data["blas"] == "default" else "-" + data["blas"])
    for r in data["results"]:
        busy = f"{r['gpu_busy_fraction']:.0%}" if "gpu_busy_fraction" in r else "-"
        rows.append((mode, r["what"], r["batch"], r["context"], f"{r['ms']:.2f}", f"{r['h100_floor_ms']:.2f}",
                     f"{r['floor_fraction']:.0%}", busy))
    print(f"# {path.name}: {data['device']}, init {data['runner_init_s']:.1f} s, graph capture "
          f"{data['graph_capture_s']:.2f} s for batch {data['graph_batch_sizes']}")
header = ("mode", "what", "batch", "context", "ms", "floor ms", "floor/ms", "GPU busy")
widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]
for row in [header] + rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
EOF
grep -h -A4 "^# engine throughput" "$OUT/bench.log" || true
echo "tests rc=$tests_rc, bench rc=$graphs_rc/$eager_rc, engine rc=$engine_rc, $((SECONDS - start)) s"
exit $((tests_rc != 0 || graphs_rc != 0 || eager_rc != 0 || engine_rc != 0))
