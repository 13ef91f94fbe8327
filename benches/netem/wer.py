#!/usr/bin/env python3
"""The netem report: transcription WER per network condition, against the scenario's script and
against the clean link, and the 100%-loss check.

usage: wer.py SCENARIO.toml OUT_DIR [SECONDS_TO_SESSION_END] [CALLER_EXIT_STATUS]
"""
import json
import re
import sys
import tomllib
from pathlib import Path


def words(text):
    return re.sub(r"[^a-z0-9' ]", " ", (text or "").lower()).split()


def edit_distance(ref, hyp):
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)]


def wer(pairs):
    errors = sum(edit_distance(words(r), words(h)) for r, h in pairs)
    total = sum(len(words(r)) for r, _ in pairs)
    return errors / total if total else None


def main():
    scenario, out = Path(sys.argv[1]), Path(sys.argv[2])
    ended_after = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    caller_status = sys.argv[4] if len(sys.argv) > 4 else None
    script = [t["text"] for t in tomllib.loads(scenario.read_text())["turn"]]
    rows, clean_by_turn = [], {}
    for name in ["clean", "loss-5", "loss-10", "jitter-40ms", "loss-5-jitter"]:
        report = out / name / "report.json"
        if not report.exists():
            rows.append((name, None, None, 0, 0))
            continue
        turns = json.loads(report.read_text())["turns"]
        heard = [(t, t.get("user_text")) for t in turns if not t.get("barge_in")]
        pairs = [(script[t["turn"] - 1], text or "") for t, text in heard]  # turns count from 1
        if name == "clean":
            clean_by_turn = {(t["rep"], t["turn"]): text or "" for t, text in heard}
        vs_clean = [
            (clean_by_turn[(t["rep"], t["turn"])], text or "")
            for t, text in heard
            if (t["rep"], t["turn"]) in clean_by_turn
        ]
        answered = sum(1 for t, _ in heard if t.get("v2v_ms") is not None)
        rows.append((name, wer(pairs), wer(vs_clean), answered, len(heard)))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    shaper = (out / "shaper.txt").read_text().strip() if (out / "shaper.txt").exists() else ""
    print("# Packet loss and jitter on the caller's uplink (WebRTC/Opus)\n")
    print(f"Scenario `{scenario}`; report folders in `{out}`; {shaper}.\n")
    print("| condition | WER vs script | WER vs clean | turns answered |")
    print("|---|---|---|---|")
    for name, w_script, w_clean, answered, spoken in rows:
        if (out / f"{name}.skipped").exists():
            print(f"| {name} | skipped: no sch_netem, and no NFQUEUE jitter (shaper.txt) | | |")
            continue
        print(f"| {name} | {fmt(w_script)} | {fmt(w_clean)} | {answered}/{spoken} |")
    # Without sch_netem, what the userspace jitter actually did to the caller's packets.
    held = [(name, out / f"{name}.jitter.log") for name, *_ in rows]
    held = [(name, log.read_text().strip().splitlines()) for name, log in held if log.exists()]
    if any(lines for _, lines in held):
        print()
        for name, lines in held:
            if lines:
                print(f"- {name}: {lines[-1]}")
    print("\n## 100% loss mid-call (SIP, media timeout 5 s)\n")
    if ended_after:
        print(f"- The server ended the session {float(ended_after):.1f} s after the link went dead.")
    else:
        print("- **The session did not end within 30 s of the link going dead.**")
    print(f"- The caller exited with status {caller_status} (124 would mean it hung until killed).")


main()
