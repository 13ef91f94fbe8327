#!/usr/bin/env bash
# ASR benchmark: talkline's streaming recognizer vs faster-whisper on the same clips and threads.
# Usage: benches/asr/run.sh [THREADS]   (needs `talkline models fetch`; makes a venv under
# ${BENCH_DIR:-/tmp/talkline-bench-asr} with faster-whisper from PyPI)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
threads=${1:-2}
work=${BENCH_DIR:-/tmp/talkline-bench-asr}
mkdir -p "$work"
cd "$root"
cargo build --bin talkline
bin="${CARGO_TARGET_DIR:-$root/target}/debug/talkline"
models=$("$bin" models dir)
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q faster-whisper==1.2.1 numpy

# Clips: espeak-ng questions a patient might ask, 1 s of silence around each, 16 kHz mono.
sentences=(
  "Is my hemoglobin normal?"
  "What does a high cholesterol number mean?"
  "When should I repeat the blood test?"
  "My doctor said my kidney function was a little low, should I be worried about that?"
  "Can you read me the potassium result again please?"
  "Thank you, that was very helpful."
)
clips=()
for i in "${!sentences[@]}"; do
  clip="$work/trimmed$i.wav"
  if [ ! -f "$clip" ]; then
    espeak-ng -v en-us -w "$work/raw.wav" "${sentences[$i]}"
    # Trim espeak's own silence so that the true end of speech is exactly 1.0 s before the end.
    sox -D "$work/raw.wav" -r 16000 -c 1 -b 16 "$clip" silence 1 0.005 0.1% reverse \
      silence 1 0.005 0.1% reverse pad 1.0 1.0
  fi
  clips+=("$clip")
done
cd "$work"
"$work/venv/bin/python" "$here/compare.py" "$bin" "$models/whisper-tiny.en/ct2" "$threads" "${clips[@]}"
