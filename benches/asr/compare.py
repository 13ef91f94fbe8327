#!/usr/bin/env python3
"""End-of-speech -> final transcript: talkline's streaming recognizer vs faster-whisper.

Both see the same clips, the same utterance boundaries and the same thread count. talkline's
numbers come from `talkline transcribe --json`, which replays the clip on a live media clock and
charges every decode's measured wall time to it (so a decode that is still running when the
endpoint fires delays the final, as it would live); faster-whisper (int8, the same tiny.en CTranslate2 model, beam 1 and beam 5) is
run the way a segmented STT runs: on the whole utterance once the same endpoint has fired, so
its end-of-speech -> final time is the same endpoint delay plus its decode time.

Usage: compare.py TALKLINE_BIN CT2_MODEL_DIR THREADS CLIP.wav [CLIP.wav ...]
Prints a Markdown table and writes results.json next to this script's working directory.
"""
import json
import statistics
import subprocess
import sys
import time
import wave

import numpy as np
from faster_whisper import WhisperModel


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def read_wav_16k(path):
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def main():
    talkline, ct2_dir, threads, clips = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    fw = WhisperModel(ct2_dir, device="cpu", compute_type="int8", cpu_threads=threads)
    # Warm both up once (first inference pays for allocation).
    fw.transcribe(np.zeros(16000, dtype=np.float32), language="en")
    # Two end points: the true end of speech (each clip ends with exactly 1.0 s of silence) and
    # the VAD's endpoint (the same for both engines: when the silence was long enough).
    rows = {"talkline": [], "fw_beam1": [], "fw_beam5": []}
    from_endpoint = {"talkline": [], "fw_beam1": [], "fw_beam5": []}
    partial_ms, decode_total, audio_total = [], 0.0, 0.0
    fw_total = {"fw_beam1": 0.0, "fw_beam5": 0.0}
    for clip in clips:
        audio = read_wav_16k(clip)
        audio_total += len(audio) / 16000
        out = subprocess.run([talkline, "transcribe", "--json", "--threads", str(threads), clip],
                             check=True, capture_output=True, text=True).stdout
        events = [json.loads(line) for line in out.splitlines()]
        true_eos = len(audio) / 16000 - 1.0
        endpoint_t = None
        for e in events:
            if e["type"] == "speech_ended":
                endpoint_t = e["t"]
            if e["type"] == "partial":
                partial_ms.append(e["lag_ms"])
                decode_total += e["decode_ms"] / 1000
            if e["type"] != "final":
                continue
            if not e["from_pause_decode"]:
                decode_total += e["decode_ms"] / 1000
            rows["talkline"].append((e["t"] - true_eos) * 1000)
            from_endpoint["talkline"].append((e["t"] - endpoint_t) * 1000)
            segment = audio[int(max(e["start"] - 0.25, 0) * 16000):int((e["end"] + 0.2) * 16000)]
            for name, beam in (("fw_beam1", 1), ("fw_beam5", 5)):
                t0 = time.perf_counter()
                segs, _ = fw.transcribe(segment, language="en", beam_size=beam,
                                        condition_on_previous_text=False)
                text = " ".join(s.text.strip() for s in segs)
                ms = (time.perf_counter() - t0) * 1000
                fw_total[name] += ms / 1000
                rows[name].append((endpoint_t - true_eos) * 1000 + ms)
                from_endpoint[name].append(ms)
            print(f"  {e['text']!r:60} talkline {rows['talkline'][-1]:.0f} ms | fw-b1 "
                  f"{rows['fw_beam1'][-1]:.0f} ms {text!r}", file=sys.stderr)

    report = {
        "threads": threads, "clips": clips, "utterances": len(rows["talkline"]),
        "eos_to_final_ms": {k: {"p50": pct(v, 50), "p95": pct(v, 95)} for k, v in rows.items()},
        "endpoint_to_final_ms": {k: {"p50": pct(v, 50), "p95": pct(v, 95)} for k, v in from_endpoint.items()},
        "partial_lag_ms": {"p50": pct(partial_ms, 50), "p95": pct(partial_ms, 95)},
        "rtf": {"talkline_streaming": decode_total / audio_total,
                **{k: v / audio_total for k, v in fw_total.items()}},
    }
    json.dump(report, open("results.json", "w"), indent=2)
    t, v = report["eos_to_final_ms"], report["endpoint_to_final_ms"]
    print("| engine | true EOS->final p50 / p95 ms | ratio p50 | VAD endpoint->final p50 / p95 ms |")
    print("|---|---|---|---|")
    for k in rows:
        print(f"| {k} | {t[k]['p50']:.0f} / {t[k]['p95']:.0f} | {t[k]['p50'] / t['talkline']['p50']:.2f} "
              f"| {v[k]['p50']:.0f} / {v[k]['p95']:.0f} |")
    print(f"\npartial update lag (newest audio -> partial) p50 {report['partial_lag_ms']['p50']:.0f} ms, "
          f"p95 {report['partial_lag_ms']['p95']:.0f} ms; utterances: {report['utterances']}")
    print("real-time factor (decode time / audio time): " +
          ", ".join(f"{k} {v:.3f}" for k, v in report["rtf"].items()))


if __name__ == "__main__":
    main()
