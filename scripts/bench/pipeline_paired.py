#!/usr/bin/env python3
"""Single-stream decode through a 2-worker pipeline against 1 shard, in alternating rounds.

Issue 3's target (2 shards ≥ 95% of 1 shard) is a 5% question, and on this shared VM one pass of the
one-process engine moves 10-20% from one minute to the next. So, as paired.py does for llama.cpp, each
round runs, back to back with the same threads: `computepool bench --shards 1 --tg 128` (1 shard: one
worker process serving the whole model, reached over loopback through its request API, as the pipeline
is), `computepool bench --shards 2 --tg 128` (two worker processes), and `computepool bench --tg 128`
(the one-process engine, no worker and no client at all). The order rotates between rounds, and the
ratios are taken within the round.

    pipeline_paired.py --computepool BIN --model DIR [--rounds 7] [--tg 128] [--threads 2 --threads 1]
                       [--busy-poll-us 20000] [--compute-cpus 0] [--keep-cpus-awake] [--split-head]

With --busy-poll-us, each thread count whose 2 workers' threads together fit this machine's cores is
run once more with the workers' compute threads polling for their next job instead of sleeping (the
worker's `--busy-poll-us`: a core kept busy while the other shard computes, as a worker with a machine
of its own can afford; the 1-shard worker gets the same flag). Where the workers share cores, polling
would slow the shard that computes, so it is not run. Without the flag each worker keeps its default:
the 2 shards sleep at once, the 1-shard worker polls for 1 ms (its next job is its own token).

With --compute-cpus, each of those configurations with 1 thread per process is run once more with every
worker's compute on the CPUs given (`worker --compute-cpus`; the 1-shard worker's too): a single stream
computes on one shard at a time, and shards that take turns on one core never start a step on a core
that sat idle (worker/cpus.rs says what that costs on a VM).

With --keep-cpus-awake, each configuration with 1 thread per process whose workers sleep between steps
is run once more with every worker keeping its CPUs awake while it serves (`worker --keep-cpus-awake`:
SCHED_IDLE spinners, so no vCPU halts between steps and none takes compute time; worker/keep_awake.rs).

With --split-head, each configuration with 1 thread per process that neither places the compute nor
keeps CPUs awake is run once more with the 2 shards splitting the output head (`worker --split-head`:
the entry and the exit compute half the vocabulary's logits each, at once; the 1-shard worker, which
serves the whole model, ignores it).

One JSON line per configuration: each side's per-round tokens/s and the per-round ratios.
"""
import os
import argparse
import json
import sys
import time

from paired import computepool_tg, spread  # the same runner and statistics as ours against llama.cpp


def tg(binary, model, tg_tokens, threads, shards, busy_poll_us=0, compute_cpus=None, keep_awake=False, split_head=False):
    """tokens/s of one tg run: `shards` 0 is the one-process engine, N ≥ 1 a pool of N workers."""
    args = ["--model", model, "--threads", str(threads), "--dtype", "bf16"]
    if shards > 0:
        args += ["--shards", str(shards)]
    if shards > 0 and busy_poll_us:
        args += ["--busy-poll-us", str(busy_poll_us)]
    if shards > 0 and compute_cpus:
        args += ["--compute-cpus", compute_cpus]
    if shards > 0 and keep_awake:
        args += ["--keep-cpus-awake"]
    if shards > 1 and split_head:
        args += ["--split-head"]
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
    ap.add_argument("--compute-cpus",
                    help="also run the 1-thread configurations with every worker's compute on these CPUs")
    ap.add_argument("--keep-cpus-awake", action="store_true",
                    help="also run the 1-thread sleeping configurations with the workers keeping their CPUs awake")
    ap.add_argument("--split-head", action="store_true",
                    help="also run the plain 1-thread configurations with the 2 shards splitting the output head")
    a = ap.parse_args()
    if a.rounds < 1 or a.shards < 2:
        ap.error("--rounds must be at least 1 and --shards at least 2")
    # (threads, busy_poll_us, compute_cpus, keep_awake, split_head)
    configs = [(threads, 0, None, False, False) for threads in a.threads or [2]]
    if a.busy_poll_us > 0:
        cores = os.cpu_count() or 1
        configs += [(t, a.busy_poll_us, None, False, False) for t, _, _, _, _ in list(configs) if t * a.shards <= cores]
    plain = [(t, poll) for t, poll, _, _, _ in configs if t == 1]
    if a.compute_cpus:
        configs += [(t, poll, a.compute_cpus, False, False) for t, poll in plain]
    if a.keep_cpus_awake:
        configs += [(t, 0, None, True, False) for t, poll in plain if poll == 0]
    if a.split_head:
        configs += [(t, poll, None, False, True) for t, poll in plain]
    sides = [0, 1, a.shards]  # one process, 1 shard, the pipeline
    for threads, busy_poll_us, compute_cpus, keep_awake, split_head in configs:
        runs = {n: [] for n in sides}
        for r in range(a.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            got = {n: tg(a.computepool, a.model, a.tg, threads, n, busy_poll_us, compute_cpus, keep_awake, split_head)
                   for n in order}
            for n in sides:
                runs[n].append(got[n])
            o, one, p = got[0], got[1], got[a.shards]
            polling = f", polling {busy_poll_us} µs" if busy_poll_us else ""
            placed = f", compute on CPUs {compute_cpus}" if compute_cpus else ""
            placed += ", CPUs kept awake" if keep_awake else ""
            placed += ", split head" if split_head else ""
            print(f"[pipeline-paired {time.strftime('%H:%M:%S')}] {threads} threads{polling}{placed}, round {r + 1}/{a.rounds}: "
                  f"1 process {o:.1f}, 1 shard {one:.1f}, {a.shards} shards {p:.1f} tok/s, "
                  f"{a.shards} shards ÷ 1 shard {p / one:.3f}, ÷ 1 process {p / o:.3f}", file=sys.stderr)
        one_shard = [p / s for p, s in zip(runs[a.shards], runs[1])]
        one_process = [p / o for p, o in zip(runs[a.shards], runs[0])]
        print(json.dumps({
            "threads": threads, "busy_poll_us": busy_poll_us, "compute_cpus": compute_cpus,
            "keep_cpus_awake": keep_awake, "split_head": split_head, "shards": a.shards, "test": f"tg{a.tg}", "rounds": a.rounds,
            "one_process_ts": runs[0], "one_shard_ts": runs[1], "pipeline_ts": runs[a.shards],
            "ratios_to_one_shard": one_shard, "ratios": one_process,
            "one_process": spread(runs[0]), "one_shard": spread(runs[1]), "pipeline": spread(runs[a.shards]),
            "ratio_to_one_shard": spread(one_shard), "ratio": spread(one_process),
            "rounds_at_target": sum(1 for x in one_shard if x >= 0.95),
        }), flush=True)


if __name__ == "__main__":
    main()
