"""Python piper-tts side of benches/tts/run.sh: the same sentences, voice and threads as
tts/examples/tts_bench.rs. Prints one JSON object."""

import json
import sys
import time

import onnxruntime
from piper import PiperVoice
from piper.config import PiperConfig

FIRST_CLAUSE = "Your results are back,"
PARAGRAPH = (
    "Your results are back, and they look good. Your hemoglobin is within the "
    "normal range, and so are your white cells. Your cholesterol is a little high, so we should talk "
    "about diet and exercise at your next visit. Please call the clinic if you have any questions."
)
FIRST_AUDIO_RUNS = 20
RTF_RUNS = 5


def percentile(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)]


def main():
    model, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with open(model + ".json", encoding="utf-8") as f:
        config = PiperConfig.from_dict(json.load(f))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    voice = PiperVoice(session=session, config=config)
    for _ in voice.synthesize("Warming up."):  # same warm-up as talkline
        pass

    first_audio_ms = []
    for _ in range(FIRST_AUDIO_RUNS):
        t0 = time.perf_counter()
        next(iter(voice.synthesize(FIRST_CLAUSE)))
        first_audio_ms.append((time.perf_counter() - t0) * 1000)

    rtf = []
    for _ in range(RTF_RUNS):
        t0 = time.perf_counter()
        samples = sum(len(c.audio_float_array) for c in voice.synthesize(PARAGRAPH))
        rtf.append((time.perf_counter() - t0) / (samples / config.sample_rate))

    print(
        json.dumps(
            {
                "impl": "piper-tts",
                "threads": threads,
                "first_audio_ms_p50": round(percentile(first_audio_ms, 0.5), 1),
                "first_audio_ms_p95": round(percentile(first_audio_ms, 0.95), 1),
                "rtf_p50": round(percentile(rtf, 0.5), 4),
                "rtf_p95": round(percentile(rtf, 0.95), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
