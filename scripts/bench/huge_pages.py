#!/usr/bin/env python3
"""Weights in huge pages against the same weights in 4 KiB pages, in alternating rounds.

A loaded shard keeps its matrices in regions advised for transparent huge pages (host/engine/src/
weight_mem.rs); `COMPUTEPOOL_HUGE_PAGES=off` keeps the same regions in small pages. Each round runs
every configuration both ways back to back (the order alternating between rounds), and the ratio is
taken within the round, as paired.py does: this VM moves 10-20% from one minute to the next.

    huge_pages.py --computepool BIN --model DIR [--rounds 7] [--tg 128]

Configurations: single-stream decode in one process on 1 and 2 threads, and through a 2-worker
pipeline (1 thread per worker, polling between steps, as pipeline_paired.py's last row).
One JSON line per configuration: both sides' per-round tokens/s and the per-round ratios.
"""
import argparse
import json
import sys
import time

from paired import computepool_tg, spread

CONFIGS = [
    ("one process, 1 thread", ["--threads", "1"]),
    ("one process, 2 threads", ["--threads", "2"]),
    ("2 shards, 1 thread per worker, polling", ["--threads", "1", "--shards", "2", "--busy-poll-us", "20000"]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--computepool", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tg", type=int, default=128)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    for name, args in CONFIGS:
        args = ["--model", a.model, "--dtype", "bf16", *args]
        on, off, ratios = [], [], []
        for r in range(a.rounds):
            runs = [("on", {}), ("off", {"COMPUTEPOOL_HUGE_PAGES": "off"})]
            got = {}
            for side, env in (runs if r % 2 == 0 else runs[::-1]):
                got[side] = computepool_tg(a.computepool, args, a.tg, env)
            on.append(got["on"])
            off.append(got["off"])
            ratios.append(got["on"] / got["off"])
            print(f"[huge-pages {time.strftime('%H:%M:%S')}] {name}, round {r + 1}/{a.rounds}: "
                  f"huge pages {got['on']:.1f}, small pages {got['off']:.1f} tok/s, ratio {ratios[-1]:.3f}",
                  file=sys.stderr)
        print(json.dumps({
            "config": name, "test": f"tg{a.tg}", "rounds": a.rounds, "huge_ts": on, "small_ts": off, "ratios": ratios,
            "huge": spread(on), "small": spread(off), "ratio": spread(ratios),
            "rounds_faster": sum(1 for x in ratios if x > 1),
        }), flush=True)


if __name__ == "__main__":
    main()
