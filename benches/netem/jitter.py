#!/usr/bin/env python3
"""Jitter without sch_netem: holds each packet that nftables queues to NFQUEUE QUEUE for a random
delay before accepting it, as `tc netem delay MEAN JITTER distribution normal` would. Packets
whose delays differ by more than their spacing leave out of order, as on a real jittery path.

usage: jitter.py QUEUE MEAN_MS JITTER_MS [SEED]

Needs root and the NetfilterQueue package (which needs Debian's libnetfilter-queue-dev to build);
benches/netem/run.sh installs both. Prints "ready" once bound, and on SIGTERM the packets still
held, accepted at once, and a summary line.
"""
import heapq
import random
import select
import signal
import sys
import time

from netfilterqueue import NetfilterQueue


def main():
    queue, mean, jitter = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else None)
    held = []  # (due, arrival order, packet): a heap, soonest first
    stats = {"packets": 0, "reordered": 0, "delay_ms": 0.0}
    last_due = [0.0]

    def hold(packet):
        # Normal like netem's, cut at 0: a packet cannot leave before it came.
        delay = max(0.0, rng.gauss(mean, jitter)) / 1000
        due = time.monotonic() + delay
        if due < last_due[0]:
            stats["reordered"] += 1
        last_due[0] = max(last_due[0], due)
        stats["packets"] += 1
        stats["delay_ms"] += delay * 1000
        heapq.heappush(held, (due, stats["packets"], packet))

    nfqueue = NetfilterQueue()
    # The kernel queues up to 1024 packets; audio at 50 packets/s never comes close.
    nfqueue.bind(queue, hold)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    fd = nfqueue.get_fd()
    print("ready", flush=True)
    try:
        while not stop:
            now = time.monotonic()
            while held and held[0][0] <= now:
                heapq.heappop(held)[2].accept()
            timeout = max(0.0, held[0][0] - now) if held else 0.5
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                nfqueue.run(block=False)
    finally:
        while held:
            heapq.heappop(held)[2].accept()
        nfqueue.unbind()
        n = stats["packets"]
        mean_seen = stats["delay_ms"] / n if n else 0.0
        print(
            f"jitter: {n} packets, mean delay {mean_seen:.1f} ms, {stats['reordered']} reordered",
            flush=True,
        )


if __name__ == "__main__":
    main()
