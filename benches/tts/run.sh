#!/usr/bin/env bash
# Time to first audio and real-time factor: talkline's Piper stage vs Python piper-tts 1.8.0, same
# voice, same ONNX Runtime version (1.32.0), same threads, measured back to back in one run.
# Targets (issue 5): first audio <= 80 ms after the first clause is complete; RTF <= 0.1 on 1 thread.
#
#   benches/tts/run.sh [THREADS]
#
# Needs `talkline models fetch` (voice, ONNX Runtime, piper-espeak-data). Python piper-tts is
# installed into a venv under /tmp on first use (from the Python package index).
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-1}"
cache="${TALKLINE_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/talkline}"
model="$cache/piper-joe/en_US-joe-medium.onnx"
ort_lib="$cache/onnxruntime/libonnxruntime.so.1.32.0"
espeak="$cache/piper-espeak-data"
for f in "$model" "$ort_lib" "$espeak/espeak-ng-data/phontab"; do
  [ -e "$f" ] || { echo "$f is missing: run talkline models fetch" >&2; exit 1; }
done

venv="${PIPER_VENV:-/tmp/piper-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import piper" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet piper-tts==1.8.0
fi

# The dev profile optimises dependencies (ONNX Runtime is a prebuilt library either way).
cargo build --quiet -p talkline-tts --example tts_bench
target="${CARGO_TARGET_DIR:-target}"
rust=$("$target/debug/examples/tts_bench" "$model" "$ort_lib" "$espeak" "$threads")
python=$("$venv/bin/python" benches/tts/piper_side.py "$model" "$threads")
echo "$rust"
echo "$python"
python3 - "$rust" "$python" <<'PY'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for key in ["first_audio_ms_p50", "first_audio_ms_p95", "rtf_p50", "rtf_p95"]:
    print(f"{key:<20} talkline {r[key]:>8}  piper-tts {p[key]:>8}  ratio {r[key] / p[key]:.2f}")
print("targets: first audio <= 80 ms, RTF <= 0.1 (1 thread):",
      "first audio", "met" if r["first_audio_ms_p95"] <= 80 else "NOT met", "(p95);",
      "RTF", "met" if r["rtf_p50"] <= 0.1 else "NOT met", "(p50)")
PY
