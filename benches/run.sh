#!/usr/bin/env bash
# The full latency suite in one command: the clinic scenario over the real WebSocket transport,
# a sweep of concurrent sessions until p95 voice-to-voice passes the budget, and the per-stage
# baselines (faster-whisper, llama-cpp-python, piper-tts) measured in the same run.
#
#   benches/run.sh [extra `talkline bench` flags, e.g. --pipecat ../shared/anchors/pipecat]
#
# Needs `talkline models fetch`, espeak-ng and sox. The report lands in target/bench/<date-time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev profile optimises every dependency and the LLM kernels (as benches/asr, tts and v2v
# use it); PROFILE=release measures a release build instead.
profile=${PROFILE:-dev}
cargo build --profile "$profile" --bin talkline
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
bin="${CARGO_TARGET_DIR:-target}/$dir/talkline"
exec "$bin" bench --scenario benches/scenarios/clinic.toml --sweep --baselines "$@"
