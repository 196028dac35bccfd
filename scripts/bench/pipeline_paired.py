#!/usr/bin/env python3
"""Single-stream decode through a 2-worker pipeline against the one-process engine, in alternating rounds.

Issue 3's target (2 shards ≥ 95% of 1 shard) is a 5% question, and on this shared VM one pass of the
one-process engine moves 10-20% from one minute to the next. So, as paired.py does for llama.cpp, each
round runs `computepool bench --tg 128` (one process) and `computepool bench --shards 2 --tg 128` (two
worker processes on loopback, measured through the entry's request API) back to back with the same
threads, the order alternating between rounds, and the ratio is taken within the round.

    pipeline_paired.py --computepool BIN --model DIR [--rounds 7] [--tg 128] [--threads 2 --threads 1]
                       [--busy-poll-us 20000]

With --busy-poll-us, each thread count whose workers' threads together fit this machine's cores is run
once more with the workers' compute threads polling for their next job instead of sleeping (the
worker's `--busy-poll-us`: a core kept busy while the other shard computes, as a worker with a machine
of its own can afford). Where the workers share cores, polling would slow the shard that computes, so
it is not run.

One JSON line per configuration: both sides' per-round tokens/s and the per-round ratios.
"""
import os
import argparse
import json
import sys
import time

from paired import computepool_tg, spread  # the same runner and statistics as ours against llama.cpp


def tg(binary, model, tg_tokens, threads, shards, busy_poll_us=0):
    args = ["--model", model, "--threads", str(threads), "--dtype", "bf16"]
    if shards > 1:
        args += ["--shards", str(shards), "--busy-poll-us", str(busy_poll_us)]
    return computepool_tg(binary, args, tg_tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--computepool", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, action="append", help="threads per process; repeatable (default 2)")
    ap.add_argument("--busy-poll-us", type=int, default=0,
                    help="also run the thread counts that fit the cores with workers polling this long")
    a = ap.parse_args()
    if a.rounds < 1 or a.shards < 2:
        ap.error("--rounds must be at least 1 and --shards at least 2")
    configs = [(threads, 0) for threads in a.threads or [2]]
    if a.busy_poll_us > 0:
        cores = os.cpu_count() or 1
        configs += [(threads, a.busy_poll_us) for threads, _ in list(configs) if threads * a.shards <= cores]
    for threads, busy_poll_us in configs:
        one, pipe, ratios = [], [], []
        for r in range(a.rounds):
            if r % 2 == 1:
                p = tg(a.computepool, a.model, a.tg, threads, a.shards, busy_poll_us)
                o = tg(a.computepool, a.model, a.tg, threads, 1)
            else:
                o = tg(a.computepool, a.model, a.tg, threads, 1)
                p = tg(a.computepool, a.model, a.tg, threads, a.shards, busy_poll_us)
            one.append(o)
            pipe.append(p)
            ratios.append(p / o)
            polling = f", polling {busy_poll_us} µs" if busy_poll_us else ""
            print(f"[pipeline-paired {time.strftime('%H:%M:%S')}] {threads} threads{polling}, round {r + 1}/{a.rounds}: "
                  f"1 process {o:.1f}, {a.shards} shards {p:.1f} tok/s, ratio {p / o:.3f}", file=sys.stderr)
        print(json.dumps({
            "threads": threads, "busy_poll_us": busy_poll_us, "shards": a.shards, "test": f"tg{a.tg}", "rounds": a.rounds,
            "one_process_ts": one, "pipeline_ts": pipe, "ratios": ratios,
            "one_process": spread(one), "pipeline": spread(pipe), "ratio": spread(ratios),
            "rounds_at_target": sum(1 for x in ratios if x >= 0.95),
        }), flush=True)


if __name__ == "__main__":
    main()
