#!/usr/bin/env python3
"""What idling between steps costs the next step, with no process, socket or wake-up in between.

A pipeline worker computes a step, then waits for its neighbour's next frame. host/engine's
`split_speed` example runs the whole model and then the same model as two shards in ONE thread, token
by token, and can wait before each shard's step as a worker waits: sleeping (`--nap-us`: the core
idles; on a VM its vCPU halts) or polling the clock (`--spin-us`: the core stays busy). Each round runs
both back to back (the order alternating between rounds); each side's split is divided by its own
whole-model pass (no waits, same invocation, seconds before), which cancels this VM's drift from one
minute to the next, and the round's penalty is the sleeping side's ratio over the polling side's.

    halt_penalty.py --split-speed BIN --model DIR [--rounds 7] [--gap-us 5000] [--tg 64] [--threads 1]

One JSON line: both sides' per-round split ÷ whole ratios, the per-round penalties and their spread.
"""
import argparse
import json
import subprocess
import sys
import time

from paired import spread


def split_over_whole(binary, model, tg, threads, wait_flag, gap_us):
    """split ms ÷ whole ms of the last of two rounds (the first warms the caches), and the whole ms."""
    out = subprocess.run(
        [binary, model, "--threads", str(threads), "--tg", str(tg), "--rounds", "2", wait_flag, str(gap_us), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    last = json.loads(out.strip().splitlines()[-1])
    return last["split_ms"] / last["whole_ms"], last["whole_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split-speed", required=True, help="the split_speed example's binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gap-us", type=int, default=5000)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.rounds < 1 or a.gap_us < 1 or a.tg < 1:
        ap.error("--rounds, --gap-us and --tg must be at least 1")
    sleeping, polling, penalties, whole = [], [], [], []
    for r in range(a.rounds):
        sides = [("sleep", "--nap-us"), ("spin", "--spin-us")]
        got = {}
        for side, flag in (sides if r % 2 == 0 else sides[::-1]):
            got[side] = split_over_whole(a.split_speed, a.model, a.tg, a.threads, flag, a.gap_us)
        sleeping.append(got["sleep"][0])
        polling.append(got["spin"][0])
        whole.append(got["sleep"][1])
        whole.append(got["spin"][1])
        penalties.append(sleeping[-1] / polling[-1])
        print(f"[halt-penalty {time.strftime('%H:%M:%S')}] round {r + 1}/{a.rounds}: split ÷ whole after a sleep "
              f"{sleeping[-1]:.3f}, after a spin {polling[-1]:.3f}, penalty {penalties[-1]:.3f}", file=sys.stderr)
    print(json.dumps({
        "gap_us": a.gap_us, "tg": a.tg, "threads": a.threads, "rounds": a.rounds,
        "after_sleep": spread(sleeping), "after_spin": spread(polling), "whole_ms": spread(whole),
        "penalty": spread(penalties), "penalties": penalties,
        "rounds_slower": sum(1 for x in penalties if x > 1),
    }), flush=True)


if __name__ == "__main__":
    main()
