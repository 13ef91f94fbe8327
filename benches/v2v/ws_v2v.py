#!/usr/bin/env python3
"""Voice-to-voice latency of a running `talkline serve`, over its real WebSocket transport.

Streams a WAV (16 kHz mono PCM16) to ws://ADDR/ws in real time, 20 ms per frame, and records
when each agent audio frame arrives. For each user turn (true end-of-speech times from a JSON
file in the Pipecat anchor's format), voice-to-voice = arrival of the first agent frame with any
|sample| > 1% of full scale after that end of speech - (stream start + end of speech).

Usage: ws_v2v.py ADDR user_turns.wav user_turns.json [--reps N] [--out results.jsonl]
"""
import argparse
import asyncio
import json
import time
import wave

import numpy as np
import websockets


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_run(addr, pcm, eos_times, tail_s):
    async with websockets.connect(f"ws://{addr}/ws", max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "hello", "sample_rate": 16000}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        frames = [pcm[i:i + 320] for i in range(0, len(pcm), 320)]
        frames += [np.zeros(320, dtype=np.int16)] * int(tail_s * 50)
        audio_arrivals, events = [], []
        start = time.perf_counter()

        async def sender():
            for i, f in enumerate(frames):
                delay = start + i * 0.02 - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(f.tobytes())
            await ws.send(json.dumps({"type": "bye"}))

        async def receiver():
            try:
                async for msg in ws:
                    t = time.perf_counter() - start
                    if isinstance(msg, bytes):
                        x = np.frombuffer(msg, dtype=np.int16)
                        if np.abs(x).max(initial=0) > 327:
                            audio_arrivals.append(t)
                    else:
                        e = json.loads(msg)
                        e["t"] = t
                        events.append(e)
            except websockets.ConnectionClosed:
                pass

        await asyncio.gather(sender(), receiver())
    turns = []
    for i, eos in enumerate(eos_times):
        nxt = eos_times[i + 1] if i + 1 < len(eos_times) else float("inf")
        first = next((t for t in audio_arrivals if eos < t < nxt), None)
        turns.append({"turn": i + 1, "eos_s": eos,
                      "v2v_ms": None if first is None else (first - eos) * 1000})
    server_turns = [e for e in events if e.get("type") == "turn"]
    return turns, server_turns


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("wav")
    ap.add_argument("turns_json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tail", type=float, default=4.0)
    ap.add_argument("--out", default="v2v.jsonl")
    args = ap.parse_args()
    with wave.open(args.wav) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    spec = json.load(open(args.turns_json))
    eos_times = [t["speech_end_s"] for t in spec["turns"]]
    all_v2v = []
    with open(args.out, "w") as out:
        for rep in range(args.reps):
            turns, server_turns = await one_run(args.addr, pcm, eos_times, args.tail)
            for t in turns:
                t["rep"] = rep
                out.write(json.dumps(t) + "\n")
                if t["v2v_ms"] is not None:
                    all_v2v.append(t["v2v_ms"])
            for s in server_turns:
                out.write(json.dumps({"rep": rep, "server_turn": s}) + "\n")
            print(f"rep {rep}: " + ", ".join(
                f"turn {t['turn']} {t['v2v_ms']:.0f} ms" if t["v2v_ms"] else f"turn {t['turn']} none"
                for t in turns))
    answered = len(all_v2v)
    print(f"voice-to-voice over {answered}/{args.reps * len(eos_times)} answered turns: "
          f"p50 {pct(all_v2v, 50):.0f} ms, p95 {pct(all_v2v, 95):.0f} ms, max {max(all_v2v or [0]):.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
