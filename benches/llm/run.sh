#!/usr/bin/env bash
# The LLM stage beside llama.cpp, same GGUF, same threads, one run: prompt tok/s, decode tok/s,
# follow-up time to first token with KV reuse, and the prompt-lookup speculative speed-up.
# Targets (issue 4): decode >= 0.8x llama.cpp; follow-up time to first token <= 60 ms.
#
#   benches/llm/run.sh [MODEL.gguf] [THREADS] [REPS]
#
# Default model: the SmolLM2 Q8_0 file talkline runs (`talkline models fetch`). talkline is a
# release build of llm/examples/llm_bench.rs; llama.cpp is llama-cpp-python (the bench venv of
# `talkline bench --baselines` when present, else a venv under /tmp, from the Python package
# index) running llm/examples/llama_cpp_bench.py. Both print a JSON line; this script sets them
# side by side. Measuring on a busy machine measures the other load: it waits (up to
# $MAX_WAIT_S, default 600 s) for the 1-minute load average to fall below $MAX_LOAD (1.5).
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${TALKLINE_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/talkline}"
model="${1:-$cache/smollm2-135m/SmolLM2-135M-Instruct.Q8_0.gguf}"
threads="${2:-1}"
reps="${3:-10}"
[ -f "$model" ] || { echo "$model is missing: run talkline models fetch --only smollm2-135m" >&2; exit 1; }

venv="${LLAMA_VENV:-$cache/bench-venv}"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  venv=/tmp/llama-cpp-venv
  if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv "$venv"
    # The version `talkline bench --baselines` pins (runtime/src/bench/baselines.rs).
    "$venv/bin/pip" install --quiet numpy llama-cpp-python==0.3.36
  fi
fi

cargo build --quiet --release -p talkline-llm --example llm_bench
target="${CARGO_TARGET_DIR:-target}"

max_load="${MAX_LOAD:-1.5}"
waited=0
while awk -v max="$max_load" '{ exit !($1 >= max) }' /proc/loadavg; do
  if [ "$waited" -ge "${MAX_WAIT_S:-600}" ]; then
    echo "warning: load average still $(cut -d' ' -f1 /proc/loadavg) after ${waited} s; measuring anyway" >&2
    break
  fi
  sleep 10
  waited=$((waited + 10))
done
echo "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

rust_out=$("$target/release/examples/llm_bench" "$model" "$threads" "$reps")
echo "$rust_out" | grep -v '^JSON '
llama_out=$("$venv/bin/python" llm/examples/llama_cpp_bench.py "$model" "$threads" "$reps")
echo "$llama_out" | grep -v '^JSON '
echo
python3 - "$(echo "$rust_out" | sed -n 's/^JSON //p')" "$(echo "$llama_out" | sed -n 's/^JSON //p')" <<'PY'
import json, sys
t, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = [
    ("prompt", "prompt_tps", "tok/s"),
    ("decode", "decode_tps", "tok/s"),
    ("follow-up time to first token", "follow_up_ttft_ms", "ms"),
    ("copy reply, plain", "copy_plain_tps", "tok/s"),
    ("copy reply, prompt lookup", "copy_lookup_tps", "tok/s"),
    ("prompt lookup speed-up", "lookup_speedup", "x"),
]
print(f"{'p50 (p95)':<31} {'talkline':>17} {'llama.cpp':>17}  talkline/llama.cpp")
for name, key, unit in rows:
    a, b = t[key], l[key]
    cell = lambda s: f"{s['p50']:.1f} ({s['p95']:.1f})"
    print(f"{name + ' [' + unit + ']':<31} {cell(a):>17} {cell(b):>17}  {a['p50'] / b['p50']:.2f}x")
print(f"talkline follow-up with the transcript prefilled: {t['prefilled_ttft_ms']['p50']:.1f} ms p50 "
      f"({t['prefilled_ttft_ms']['p95']:.1f} p95); prompt-lookup acceptance "
      f"{t['lookup_acceptance_pct']['p50']:.0f}%")
decode = t["decode_tps"]["p50"] / l["decode_tps"]["p50"]
ttft = t["follow_up_ttft_ms"]["p95"]
print(f"targets: decode >= 0.8x llama.cpp: {'met' if decode >= 0.8 else 'NOT met'} ({decode:.2f}x p50); "
      f"follow-up TTFT <= 60 ms: {'met' if ttft <= 60 else 'NOT met'} ({ttft:.1f} ms p95)")
PY
