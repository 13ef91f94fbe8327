"""The llama.cpp side of llm_bench.rs: the same prompts and measurements with llama-cpp-python.

    python3 -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install llama-cpp-python
    /tmp/llamavenv/bin/python llama_cpp_bench.py MODEL.gguf [THREADS] [REPS]

llama.cpp's extra CPU buffer types (AMX/repack) segfault on some Sapphire-Rapids-class CPUs, so
they are turned off, as in shared/anchors/pipecat/llm_server.py.
"""
import sys, time
import numpy as np
import llama_cpp
import llama_cpp.llama_cpp as _ll

_orig = _ll.llama_model_default_params
def _patched():
    p = _orig()
    p.use_extra_bufts = False
    return p
_ll.llama_model_default_params = _patched
llama_cpp.llama_model_default_params = _patched

SYSTEM = "You are a friendly voice assistant for a small museum in Lyon. Answer in one or two short sentences, suitable for reading aloud. The museum opens Tuesday to Sunday from 10 am to 6 pm, closes on Mondays, and has free entry on the first Sunday of each month. Tickets cost 8 euros, 5 for students."
QUESTION = "Hi! I was wondering whether the museum is open this Sunday, and how much a ticket costs for a student?"
FOLLOW_UP = "Great, and on Monday?"
DECODE_TOKENS = 64

def chatml(messages, gen=True):
    s = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages)
    return s + ("<|im_start|>assistant\n" if gen else "")

def pct(v, p):
    v = sorted(v)
    return v[round((len(v) - 1) * p)]

def report(name, unit, v):
    print(f"{name:<34} p50 {pct(v, .5):>8.1f} {unit:<6} p95 {pct(v, .95):>8.1f} {unit}")

def main():
    path = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False, special=True)
    first = [("system", SYSTEM), ("user", QUESTION)]
    prompt = tok(chatml(first))
    eos = llm.token_eos()
    prompt_tps, decode_tps, follow = [], [], []
    for _ in range(reps):
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        prompt_tps.append(len(prompt) / (time.perf_counter() - t))
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode_tps.append(DECODE_TOKENS / (time.perf_counter() - t))

        # Follow-up turn with KV reuse: greedy reply to turn 1, then only the new tokens.
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(prompt)
        reply = []
        for _ in range(48):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt == eos:
                break
            reply.append(nxt)
            llm.eval([nxt])
        text = llm.detokenize(reply).decode(errors="replace")
        full = tok(chatml(first + [("assistant", text), ("user", FOLLOW_UP)]))
        cached = prompt + reply
        common = 0
        while common < min(len(cached), len(full)) and cached[common] == full[common]:
            common += 1
        t = time.perf_counter()
        llm.n_tokens = common
        llm._ctx.kv_cache_seq_rm(-1, common, -1)
        llm.eval(full[common:])
        int(np.argmax(llm.scores[llm.n_tokens - 1]))
        follow.append((time.perf_counter() - t) * 1000)
    print(f"{path}: llama.cpp (llama-cpp-python {llama_cpp.__version__}), {threads} thread(s), {reps} repetitions")
    report(f"prompt ({len(prompt)} tokens)", "tok/s", prompt_tps)
    report(f"decode ({DECODE_TOKENS} tokens)", "tok/s", decode_tps)
    report("follow-up time to first token", "ms", follow)

if __name__ == "__main__":
    main()
