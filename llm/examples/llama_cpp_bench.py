"""The llama.cpp side of llm_bench.rs: the same prompts and measurements with llama-cpp-python.

    python3 -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install llama-cpp-python
    /tmp/llamavenv/bin/python llama_cpp_bench.py MODEL.gguf [THREADS] [REPS]

benches/llm/run.sh runs both sides with the same GGUF and threads and prints the ratios.

llama.cpp's extra CPU buffer types (AMX/repack) segfault on some Sapphire-Rapids-class CPUs, so
they are turned off, as in shared/anchors/pipecat/llm_server.py. llama-cpp-python 0.3.36 only
copies logits into `llm.scores` with logits_all (which computes them for every prompt token and
would slow the prompt down), so the plain measurements read llama.cpp's buffer for the last
token instead, as benches/baselines/stages.py does. Prompt-lookup decoding forces logits_all
(the verifier needs a row per drafted token), so it gets its own instance, and its speed-up is
against plain greedy decoding on the same copy reply.
"""
import json
import sys
import time

import numpy as np
import llama_cpp
import llama_cpp.llama_cpp as _ll
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

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
COPY = "Please repeat this list back to me exactly, with nothing else: apples, pears, plums, cherries, apples, pears, plums, cherries, apples, pears, plums, cherries."
DECODE_TOKENS = 64
# talkline's prompt lookup drafts up to 8 tokens from n-grams of up to 4 (llm/src/speculative.rs).
LOOKUP = dict(max_ngram_size=4, num_pred_tokens=8)


def chatml(messages, gen=True):
    s = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages)
    return s + ("<|im_start|>assistant\n" if gen else "")


def pct(v, p):
    v = sorted(v)
    return v[round((len(v) - 1) * p)]


def report(name, unit, v):
    print(f"{name:<34} p50 {pct(v, .5):>8.1f} {unit:<6} p95 {pct(v, .95):>8.1f} {unit}")


def summary(v):
    return {"p50": pct(v, .5), "p95": pct(v, .95)}


def load(path, threads, **kw):
    return llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False, **kw)


def last_logits(llm):
    """The logits of the last evaluated token (without logits_all, llama.cpp keeps only that row)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def greedy_next(llm):
    return int(np.argmax(last_logits(llm)))


def copy_reply_tps(llm, prompt, eos_ids):
    """Greedy reply to COPY through llama-cpp-python's generate (with the instance's draft
    model, if any): tokens after the first per second, as talkline's decode_tokens_per_s."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    n, first_at = 0, None
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if first_at is None:
            first_at = time.perf_counter()
        if tok in eos_ids:
            break
        n += 1
        if n >= DECODE_TOKENS:
            break
    return (n - 1) / (time.perf_counter() - first_at), n


def main():
    path = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    llm = load(path, threads)
    lookup_llm = load(path, threads, draft_model=LlamaPromptLookupDecoding(**LOOKUP))
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False, special=True)
    first = [("system", SYSTEM), ("user", QUESTION)]
    prompt = tok(chatml(first))
    eos = llm.token_eos()
    eos_ids = {eos, *tok("<|im_end|>")}
    copy_prompt = tok(chatml([("user", COPY)]))
    prompt_tps, decode_tps, follow = [], [], []
    plain_tps, lookup_tps, speedup, copy_lens = [], [], [], []
    for _ in range(reps):
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        llm.eval(prompt)
        nxt = greedy_next(llm)
        prompt_tps.append(len(prompt) / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            llm.eval([nxt])
            nxt = greedy_next(llm)
        decode_tps.append(DECODE_TOKENS / (time.perf_counter() - t))

        # Follow-up turn with KV reuse: greedy reply to turn 1, then only the new tokens.
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(prompt)
        reply = []
        for _ in range(48):
            nxt = greedy_next(llm)
            if nxt in eos_ids:
                break
            reply.append(nxt)
            llm.eval([nxt])
        text = llm.detokenize(reply).decode(errors="replace")
        full = tok(chatml(first + [("assistant", text), ("user", FOLLOW_UP)]))
        cached = prompt + reply
        common = 0
        while common < min(len(cached), len(full) - 1) and cached[common] == full[common]:
            common += 1
        t = time.perf_counter()
        llm.n_tokens = common
        llm._ctx.kv_cache_seq_rm(-1, common, -1)
        llm.eval(full[common:])
        greedy_next(llm)
        follow.append((time.perf_counter() - t) * 1000)

        plain, n_plain = copy_reply_tps(llm, copy_prompt, eos_ids)
        lookup, n_lookup = copy_reply_tps(lookup_llm, copy_prompt, eos_ids)
        plain_tps.append(plain)
        lookup_tps.append(lookup)
        speedup.append(lookup / plain)
        copy_lens.append((n_plain, n_lookup))
    print(f"{path}: llama.cpp (llama-cpp-python {llama_cpp.__version__}), {threads} thread(s), {reps} repetitions")
    report(f"prompt ({len(prompt)} tokens)", "tok/s", prompt_tps)
    report(f"decode ({DECODE_TOKENS} tokens)", "tok/s", decode_tps)
    report("follow-up time to first token", "ms", follow)
    report("copy reply, plain decode", "tok/s", plain_tps)
    report("copy reply, prompt lookup", "tok/s", lookup_tps)
    report("prompt lookup speed-up", "x", speedup)
    print("JSON " + json.dumps({
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "threads": threads,
        "reps": reps,
        "prompt_tokens": len(prompt),
        "prompt_tps": summary(prompt_tps),
        "decode_tps": summary(decode_tps),
        "follow_up_ttft_ms": summary(follow),
        "copy_plain_tps": summary(plain_tps),
        "copy_lookup_tps": summary(lookup_tps),
        "lookup_speedup": summary(speedup),
        "copy_reply_tokens": copy_lens[0],
    }))


if __name__ == "__main__":
    main()
