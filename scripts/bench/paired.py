#!/usr/bin/env python3
"""Single-stream decode, ours against llama.cpp, in alternating rounds.

On this shared VM the memory bandwidth moves 20-25% from one minute to the next, so two engines measured
minutes apart cannot settle a ±5% question. Here each round times both engines back to back on the same
weights and thread count (quantized types: the same GGUF file) (llama-bench tg128, then `computepool bench --tg 128`, or the reverse: the order
alternates so that a drift within a round favours neither), and the per-round ratio is what we report:
its median and its spread over the rounds.

    paired.py --computepool BIN --model DIR --llama-bench BIN --gguf bf16=PATH --gguf f32=PATH
              [--rounds 7] [--tg 128] [--threads 2] [--depth 0] > paired.jsonl

With --depth D, both engines decode D tokens into a conversation (llama-bench's `-d D`, our `--depth D`:
each run's cache holds D prompt tokens, prefilled untimed), where attention reads the whole cache for
every token.

One JSON line per dtype: both engines' per-round tokens/s and the per-round ratios.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def llama_tg(binary, gguf, tg, threads, depth=0):
    # -r 1: one timed run (llama-bench warms up first on its own).
    cmd = [binary, "-m", gguf, "-p", "0", "-n", str(tg), "-t", str(threads), "-r", "1", "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    rows = [r for r in json.loads(out) if r["n_gen"] == tg and r["n_prompt"] == 0 and r.get("n_depth", 0) == depth]
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench printed {len(rows)} tg{tg} rows: {out[:400]}")
    return float(rows[0]["avg_ts"])


# Weight types that our engine runs from the GGUF file itself (kept quantized in memory); bf16 and f32 run
# from the HF-layout import of the same weights.
QUANTIZED = {"q4_0", "q4_1", "q8_0", "q4_k", "q4_k_m", "q6_k"}


def test_name(tg, depth=0):
    """The test's name as both benches print it: `tg128`, or `tg128 @ d2048` deep into a conversation."""
    return f"tg{tg} @ d{depth}" if depth else f"tg{tg}"


def computepool_tg(binary, args, tg, env=None, depth=0):
    """tokens/s of one timed `computepool bench ARGS --pp 0 --tg TG --repeats 1 --json` run (after the
    bench's own warm-up, as llama-bench does; with `depth`, `--depth DEPTH`), with `env` added to this
    process's environment."""
    cmd = [binary, "bench", *args, "--pp", "0", "--tg", str(tg), "--repeats", "1", "--json"]
    if depth:
        cmd += ["--depth", str(depth)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900,
                         env={**os.environ, **(env or {})}).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    rows = [r for r in rows if r["test"] == test_name(tg, depth) and r["batch"] == 1]
    if len(rows) != 1:
        raise RuntimeError(f"computepool bench printed {len(rows)} {test_name(tg, depth)} rows: {out[:400]}")
    return float(rows[0]["tokens_per_s_median"])


def ours_tg(binary, model, gguf, dtype, tg, threads, depth=0):
    if dtype in QUANTIZED:
        # The very file llama.cpp reads; --dtype only sets the type of its few unquantized tensors.
        model, dtype = gguf, "f32"
    return computepool_tg(binary, ["--model", model, "--threads", str(threads), "--dtype", dtype], tg, depth=depth)


def spread(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--computepool", required=True)
    ap.add_argument("--model", required=True, help="HF layout directory of the same weights")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", action="append", required=True, help="DTYPE=PATH, e.g. bf16=model.BF16.gguf")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=0, help="tokens already in the cache when decode is timed")
    a = ap.parse_args()
    if a.rounds < 1 or a.depth < 0:
        ap.error("--rounds must be at least 1 and --depth at least 0")
    for spec in a.gguf:
        dtype, _, gguf = spec.partition("=")
        if not gguf:
            ap.error(f"--gguf wants DTYPE=PATH, got {spec!r}")
        ours, llama, ratios = [], [], []
        for r in range(a.rounds):
            first_ours = r % 2 == 1
            if first_ours:
                o = ours_tg(a.computepool, a.model, gguf, dtype, a.tg, a.threads, a.depth)
                l = llama_tg(a.llama_bench, gguf, a.tg, a.threads, a.depth)
            else:
                l = llama_tg(a.llama_bench, gguf, a.tg, a.threads, a.depth)
                o = ours_tg(a.computepool, a.model, gguf, dtype, a.tg, a.threads, a.depth)
            ours.append(o)
            llama.append(l)
            ratios.append(o / l)
            print(f"[paired {time.strftime('%H:%M:%S')}] {dtype} {test_name(a.tg, a.depth)} round {r + 1}/{a.rounds}: ours {o:.1f}, "
                  f"llama.cpp {l:.1f} tok/s, ratio {o / l:.3f}", file=sys.stderr)
        print(json.dumps({
            "dtype": dtype, "test": test_name(a.tg, a.depth), "depth": a.depth, "threads": a.threads, "rounds": a.rounds,
            "ours_ts": ours, "llama_cpp_ts": llama, "ratios": ratios,
            "ours": spread(ours), "llama_cpp": spread(llama), "ratio": spread(ratios),
            "rounds_won": sum(1 for x in ratios if x >= 1.0),
        }), flush=True)


if __name__ == "__main__":
    main()
