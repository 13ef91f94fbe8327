#!/usr/bin/env bash
# Voice-to-voice over the real WebSocket transport, on the Pipecat anchor's audio and end-of-speech
# times (shared/anchors/pipecat: same espeak-ng questions, bit-identical WAV).
# Usage: benches/v2v/run.sh [REPS]   (needs `talkline models fetch`; PIPECAT=0 skips the peer)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
reps=${1:-3}
work=${BENCH_DIR:-/tmp/talkline-bench-v2v}
anchor=${PIPECAT_ANCHOR:-$root/../shared/anchors/pipecat}
mkdir -p "$work"
cd "$root"
cargo build --bin talkline
bin="${CARGO_TARGET_DIR:-$root/target}/debug/talkline"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q websockets==15.0.1 numpy
[ -f "$work/user_turns.wav" ] || "$work/venv/bin/python" "$anchor/make_audio.py" "$work"
echo "user_turns.wav sha256 $(sha256sum "$work/user_turns.wav" | cut -d' ' -f1) (anchor: ffcfc240...)"
"$bin" serve --listen 127.0.0.1:0 > "$work/server.out" 2> "$work/server.err" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do grep -q "serving on" "$work/server.out" 2>/dev/null && break; sleep 0.5; done
addr=$(sed -n 's/.*http:\/\/\([^ ]*\).*/\1/p' "$work/server.out" | head -1)
echo "server at $addr; load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$work/venv/bin/python" "$here/ws_v2v.py" "$addr" "$work/user_turns.wav" "$work/user_turns.json" \
  --reps "$reps" --out "$work/v2v.jsonl"
echo "per-turn records: $work/v2v.jsonl"

# The peer, in the same run: the Pipecat anchor (stock Pipecat 1.14 defaults, same audio and
# models, llama-cpp-python server). Its first run builds a venv (llama-cpp-python from source).
if [ "${PIPECAT:-1}" = 1 ]; then
  kill $server 2>/dev/null || true
  WORK="$work/pipecat" REPS="$reps" CONFIGS=default bash "$anchor/run.sh" > "$work/pipecat.log" 2>&1
  grep -E "^\| default \| all" "$work"/pipecat/summary-*.md | tail -1 | sed 's/^/pipecat v2v (p50 \/ max): /'
fi
