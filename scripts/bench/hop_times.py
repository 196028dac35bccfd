#!/usr/bin/env python3
"""Where a 2-shard pipeline's per-token time goes, from the two workers' logs.

The workers must log at trace level (`RUST_LOG=computepool::worker=trace,info`): each decode step
(`decode step … elapsed_us=N`, logged when the step ends), each frame handed to QUIC (`frame out`) and
each frame read from it (`frame in`). Two ways to get such logs:

    # a bench run (its worker logs live under /tmp/computepool-pipeline-*/ while it runs):
    RUST_LOG=computepool::worker=trace,info computepool bench --model M --shards 2 --tg 128 --threads 1
    # a test run, keeping the logs (host/node/tests/common/mod.rs):
    COMPUTEPOOL_TEST_WORKER_LOG=computepool::worker=trace,info COMPUTEPOOL_TEST_KEEP_LOGS=DIR cargo test ...

    scripts/bench/hop_times.py DIR   # DIR holds NAME-worker-0.log and NAME-worker-1.log pairs

For each token it matches the exit's step with the entry's frames around it and prints, median (p10,
p90) in µs: `wire` (a frame's `frame out` at the sender to its `frame in` at the receiver: QUIC, the
kernel, and the receiving network thread's wake), `pick` (arrival to the receiver's step start: the
hand-off to the compute thread), each shard's step, and the entry's interval between steps (the
per-token time). Both workers' clocks are the same machine's.
"""
import bisect
import glob
import re
import statistics
import sys
from datetime import datetime

def load(path):
    """(steps as (start, end), frame-in times, frame-out times), in µs since the epoch."""
    steps, ins, outs = [], [], []
    for line in open(path, errors="replace"):
        m = re.match(r"(\S+)Z ", line)
        if not m:
            continue
        t = datetime.fromisoformat(m.group(1)).timestamp() * 1e6
        if "decode step" in line:
            elapsed = int(re.search(r"elapsed_us=(\d+)", line).group(1))
            steps.append((t - elapsed, t))
        elif "frame in" in line:
            ins.append(t)
        elif "frame out" in line:
            outs.append(t)
    return steps, ins, outs


def last_before(xs, t):
    i = bisect.bisect_right(xs, t) - 1
    return xs[i] if i >= 0 else None


def first_after(xs, t):
    i = bisect.bisect_left(xs, t)
    return xs[i] if i < len(xs) else None


def summary(xs):
    if not xs:
        return "–"
    s = sorted(xs)
    return f"{statistics.median(s):.0f} ({s[len(s) // 10]:.0f}, {s[9 * len(s) // 10]:.0f})"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for entry_log in sorted(glob.glob(f"{sys.argv[1]}/*worker-0.log")):
        (entry_steps, entry_in, entry_out) = load(entry_log)
        (exit_steps, exit_in, exit_out) = load(entry_log.replace("worker-0", "worker-1"))
        if len(entry_steps) < 10:
            continue
        entry_starts = [s for s, _ in entry_steps]
        rows = {"wire entry→exit": [], "pick at exit": [], "wire exit→entry": [], "pick at entry": []}
        for start, end in exit_steps:
            arrived = last_before(exit_in, start)
            sent = last_before(entry_out, arrived) if arrived else None
            back_sent = first_after(exit_out, end)
            back_arrived = first_after(entry_in, back_sent) if back_sent else None
            next_start = first_after(entry_starts, back_arrived) if back_arrived else None
            if None in (arrived, sent, back_sent, back_arrived, next_start):
                continue
            rows["wire entry→exit"].append(arrived - sent)
            rows["pick at exit"].append(start - arrived)
            rows["wire exit→entry"].append(back_arrived - back_sent)
            rows["pick at entry"].append(next_start - back_arrived)
        rows["entry step"] = [e - s for s, e in entry_steps]
        rows["exit step"] = [e - s for s, e in exit_steps]
        # Gaps above 50 ms are between requests, not between tokens.
        rows["entry interval"] = [b - a for a, b in zip(entry_starts, entry_starts[1:]) if b - a < 50_000]
        print(f"{entry_log}: {len(entry_steps)} entry steps, {len(exit_steps)} exit steps; µs, median (p10, p90)")
        for name, xs in rows.items():
            print(f"  {name:16s} {summary(xs)}")


if __name__ == "__main__":
    main()
