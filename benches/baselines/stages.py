#!/usr/bin/env python3
"""Per-stage baselines for `talkline bench --baselines`: the same turns through faster-whisper,
llama-cpp-python and Python piper-tts, on the same models and thread counts as talkline.

A cascade, run in process, one turn after another, as a segmented pipeline would:
  ASR final   = endpoint silence (talkline's [vad] min_silence_s; no VAD delay is charged, so this
                favours the baseline) + faster-whisper decode of the whole utterance (int8, beam 1,
                the same tiny.en CTranslate2 model; method of benches/asr/compare.py);
  LLM 1st tok = ASR final + llama.cpp time to first token for the conversation so far (KV cache
                kept across turns by longest common prefix, as llm/examples/llama_cpp_bench.py);
  TTS 1st aud = LLM time to the end of the first clause + piper-tts time to the first audio of
                that clause (method of benches/tts/piper_side.py).
No transport and no output pacing: the sum is a lower bound of such a pipeline's voice-to-voice.

Usage: stages.py SPEC.json OUT.json   (SPEC: see runtime/src/bench/baselines.rs)
"""
import json
import re
import sys
import time
import wave

import numpy as np


def read_wav(path):
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def load_llama(path, threads):
    import llama_cpp
    import llama_cpp.llama_cpp as _ll

    # llama.cpp's extra CPU buffer types (AMX/repack) segfault on some Sapphire-Rapids-class CPUs
    # (as in shared/anchors/pipecat/llm_server.py).
    orig = _ll.llama_model_default_params

    def patched():
        p = orig()
        p.use_extra_bufts = False
        return p

    _ll.llama_model_default_params = patched
    llama_cpp.llama_model_default_params = patched
    return llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)


def next_token(llm):
    """Greedy next token. llama-cpp-python 0.3.36 no longer copies logits into `llm.scores`
    unless logits_all (which would compute them for every prompt token), so read llama.cpp's
    buffer: without logits_all it holds the last evaluated token's row only."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def chatml(messages):
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages) + "<|im_start|>assistant\n"


# The end of a first clause: punctuation followed by a space, or the end of a sentence.
CLAUSE_END = re.compile(r"[,.;:!?](\s|$)")


def llm_turn(llm, messages, max_tokens):
    """Greedy reply with KV reuse. Returns (ttft_ms, first_clause_ms, first_clause, reply)."""
    toks = llm.tokenize(chatml(messages).encode(), add_bos=False, special=True)
    cached = list(llm.input_ids[: llm.n_tokens])
    common = 0
    while common < min(len(cached), len(toks) - 1) and cached[common] == toks[common]:
        common += 1
    t0 = time.perf_counter()
    llm.n_tokens = common
    llm._ctx.kv_cache_seq_rm(-1, common, -1)
    llm.eval(toks[common:])
    eos = llm.token_eos()
    end_ids = {eos}
    im_end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    if len(im_end) == 1:
        end_ids.add(im_end[0])
    out, ttft, clause_ms, clause = [], None, None, None
    for _ in range(max_tokens):
        nxt = next_token(llm)
        if ttft is None:
            ttft = (time.perf_counter() - t0) * 1000
        if nxt in end_ids:
            break
        out.append(nxt)
        text = llm.detokenize(out).decode(errors="ignore")
        if clause is None and len(text.split()) >= 2 and CLAUSE_END.search(text.strip() + " "):
            clause_ms = (time.perf_counter() - t0) * 1000
            clause = text.strip()
        llm.eval([nxt])
    reply = llm.detokenize(out).decode(errors="replace").strip()
    if clause is None:
        clause_ms, clause = (time.perf_counter() - t0) * 1000, reply
    return ttft, clause_ms, clause, reply


def main():
    spec = json.load(open(sys.argv[1]))
    threads = spec["threads"]
    from faster_whisper import WhisperModel
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    fw = WhisperModel(spec["whisper_ct2"], device="cpu", compute_type="int8", cpu_threads=threads["asr"])
    fw.transcribe(np.zeros(16000, dtype=np.float32), language="en")  # warm-up, as talkline's server is warm
    llm = load_llama(spec["gguf"], threads["llm"])
    with open(spec["piper_onnx"] + ".json", encoding="utf-8") as f:
        pconf = PiperConfig.from_dict(json.load(f))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads["tts"]
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(spec["piper_onnx"], sess_options=options,
                                           providers=["CPUExecutionProvider"])
    voice = PiperVoice(session=session, config=pconf)
    for _ in voice.synthesize("Warming up."):
        pass
    llm_turn(llm, [("system", spec["system_prompt"]), ("user", "Hello.")], 4)

    endpoint_ms = spec["endpoint_ms"]
    turns = []
    for rep in range(spec["reps"]):
        history = [("system", spec["system_prompt"])]
        for i, clip in enumerate(spec["clips"]):
            audio = read_wav(clip)
            # The utterance as a segmented STT gets it: speech plus the endpoint silence.
            segment = np.concatenate([np.zeros(4000, np.float32), audio, np.zeros(3200, np.float32)])
            t0 = time.perf_counter()
            segs, _ = fw.transcribe(segment, language="en", beam_size=1, condition_on_previous_text=False)
            text = " ".join(s.text.strip() for s in segs).strip()
            asr_ms = (time.perf_counter() - t0) * 1000
            history.append(("user", text or "..."))
            ttft, clause_ms, clause, reply = llm_turn(llm, history, spec["max_tokens"])
            history.append(("assistant", reply))
            # A clause of nothing speakable (an emoji, a lone mark) gives no audio: not measured.
            t0 = time.perf_counter()
            first = next(iter(voice.synthesize(clause)), None) if any(c.isalnum() for c in clause) else None
            tts_ms = (time.perf_counter() - t0) * 1000 if first is not None else None
            asr_final = endpoint_ms + asr_ms
            turns.append({
                "rep": rep, "turn": i + 1, "transcript": text, "first_clause": clause, "reply": reply,
                "asr_decode_ms": asr_ms, "llm_ttft_ms": ttft, "llm_first_clause_ms": clause_ms,
                "tts_first_audio_compute_ms": tts_ms,
                "asr_final_ms": asr_final,
                "llm_first_token_ms": asr_final + ttft,
                "tts_first_audio_ms": None if tts_ms is None else asr_final + clause_ms + tts_ms,
            })
            print(f"baseline rep {rep} turn {i + 1}: asr {asr_ms:.0f} ms, ttft {ttft:.0f} ms, "
                  f"clause {clause_ms:.0f} ms, piper {tts_ms} ms  {text!r} -> {clause!r}", file=sys.stderr)
    import faster_whisper, llama_cpp, piper  # noqa: E401 (versions for the report)
    from importlib.metadata import version
    json.dump({
        "versions": {p: version(p) for p in ["faster-whisper", "ctranslate2", "llama_cpp_python",
                                             "piper-tts", "onnxruntime"]},
        "method": __doc__.split("Usage:")[0].strip(),
        "turns": turns,
    }, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
