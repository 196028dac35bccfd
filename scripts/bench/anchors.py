#!/usr/bin/env python3
"""Run the speed anchors (llama.cpp, candle, memory bandwidth -> roofline) and write one JSON file.

Called by scripts/bench/anchors.sh, which builds what is missing first and passes the paths in the
environment (see common.sh). Standard library only, so any python3 can run it; the tensor sizes are
read with small GGUF / safetensors header parsers below.
"""
import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time

ENV = os.environ


def log(msg):
    print(f"[anchors {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


LOADS = []  # (command, 1-min load average before, after): how quiet the machine was


def run(cmd, env=None, timeout=3600):
    log("$ " + " ".join(cmd))
    t0 = time.time()
    before = os.getloadavg()[0]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    # note: the load average includes the benchmark's own threads (~threads while it runs)
    LOADS.append({"command": os.path.basename(cmd[0]) + " " + " ".join(cmd[1:3]), "load1_before": round(before, 2),
                  "load1_after": round(os.getloadavg()[0], 2)})
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise RuntimeError(f"{cmd[0]} exited with {p.returncode}")
    return p.stdout, p.stderr, time.time() - t0


def wait_idle(max_s, threshold):
    """Wait (up to max_s) until the 1-minute load average drops below threshold."""
    t0 = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - t0 < max_s:
        log(f"waiting for an idle machine: load1 {os.getloadavg()[0]:.2f} >= {threshold}")
        time.sleep(15)
    return {"waited_s": round(time.time() - t0), "load1": os.getloadavg()[0], "threshold": threshold,
            "idle": os.getloadavg()[0] < threshold}


def stats(samples):
    return {
        "median_ts": statistics.median(samples),
        "min_ts": min(samples),
        "max_ts": max(samples),
        "samples_ts": samples,
    }


# ------------------------------------------------------------------ tensor sizes (bytes per token)

GGML_TYPE_SIZE = {  # type id: (block elements, bytes per block)
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292), 30: (1, 2),
}
GGML_TYPE_NAME = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 9: "q8_1",
                  10: "q2_k", 11: "q3_k", 12: "q4_k", 13: "q5_k", 14: "q6_k", 15: "q8_k", 30: "bf16"}


def gguf_tensor_bytes(path):
    """{name: (ggml type name, n_elements, bytes)} from a GGUF header (v2/v3)."""
    with open(path, "rb") as f:
        magic, version, n_t, n_kv = struct.unpack("<4sIQQ", f.read(24))
        assert magic == b"GGUF" and version in (2, 3), (magic, version)

        def rstr():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

        def skip_val(t):
            if t in scalar:
                f.read(struct.calcsize("<" + scalar[t]))
            elif t == 8:
                rstr()
            elif t == 9:
                et, n = struct.unpack("<IQ", f.read(12))
                if et in scalar:
                    f.seek(n * struct.calcsize("<" + scalar[et]), 1)
                else:
                    for _ in range(n):
                        skip_val(et)
            else:
                raise ValueError(f"gguf value type {t}")

        for _ in range(n_kv):
            rstr()
            (t,) = struct.unpack("<I", f.read(4))
            skip_val(t)
        out = {}
        for _ in range(n_t):
            name = rstr()
            (nd,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{nd}Q", f.read(8 * nd))
            ty, _off = struct.unpack("<IQ", f.read(12))
            n = 1
            for d in dims:
                n *= d
            blk, bb = GGML_TYPE_SIZE[ty]
            out[name] = (GGML_TYPE_NAME.get(ty, str(ty)), n, n // blk * bb)
        return out


def safetensors_tensor_bytes(files):
    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}
    out = {}
    for p in files:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            hdr = json.loads(f.read(n))
        for k, v in hdr.items():
            if k == "__metadata__":
                continue
            ne = 1
            for d in v["shape"]:
                ne *= d
            out[k] = (v["dtype"].lower(), ne, ne * size[v["dtype"]])
    return out


def bytes_per_token(tensors):
    """All weights read once per generated token; a tied embedding counts once, read in full as lm_head
    (the embedding lookup itself reads one row, left out, as is the KV cache)."""
    total = sum(b for _, _, b in tensors.values())
    tied = not any(k in tensors for k in ("output.weight", "lm_head.weight"))
    types = {}
    for ty, _, b in tensors.values():
        types[ty] = types.get(ty, 0) + b
    return {"bytes": total, "n_params": sum(n for _, n, _ in tensors.values()), "tied_embedding": tied,
            "bytes_by_type": types}


# ------------------------------------------------------------------ runners

def ggml_cpu_features(bin_dir):
    """Which SIMD paths the llama.cpp build uses (ggml_cpu_has_* from libggml-cpu.so)."""
    import ctypes
    try:
        ctypes.CDLL(os.path.join(bin_dir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(os.path.join(bin_dir, "libggml-cpu.so"))
    except OSError as e:
        return {"error": str(e)}
    out = {}
    for f in ("avx", "avx2", "fma", "f16c", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx_int8", "llamafile"):
        fn = getattr(lib, "ggml_cpu_has_" + f, None)
        if fn is not None:
            out[f] = bool(fn())
    return out


def llama_bench(binary, model, a):
    cmd = [binary, "-m", model, "-p", str(a.pp), "-n", str(a.tg), "-t", str(a.threads), "-r", str(a.reps), "-o", "json"]
    out, err, secs = run(cmd, env=dict(ENV))
    rows = json.loads(out)
    tests = []
    build = {}
    for r in rows:
        kind = "pp" if r["n_prompt"] > 0 and r["n_gen"] == 0 else "tg" if r["n_gen"] > 0 and r["n_prompt"] == 0 else "pg"
        n = r["n_prompt"] if kind == "pp" else r["n_gen"]
        t = {"name": f"{kind}{n}", "kind": kind, "n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "batch": 1,
             "repetitions": len(r["samples_ts"]), **stats([float(x) for x in r["samples_ts"]]),
             "avg_ts": r.get("avg_ts"), "stddev_ts": r.get("stddev_ts")}
        tests.append(t)
        build = {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                        "model_size", "model_n_params", "n_threads", "n_batch", "n_ubatch",
                                        "flash_attn", "type_k", "type_v", "use_mmap")}
    return {"command": cmd, "wall_s": secs, **build, "tests": tests}


def llama_batched(binary, model, a):
    """Aggregate decode speed of B parallel sequences (1-token prefix each, not shared):
    llama-batched-bench -npp 1 -ntg T -npl 1,..,B,.. ; the first run of each B is a warm-up."""
    reps = a.reps + 1
    pls = [1] * reps + [a.batch] * reps
    ctx = max(2048, a.batch * (1 + a.tg) + 64)
    cmd = [binary, "-m", model, "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", str(a.threads), "-tb", str(a.threads),
           "-npp", "1", "-ntg", str(a.tg), "-npl", ",".join(map(str, pls)), "--output-format", "jsonl"]
    out, err, secs = run(cmd, env=dict(ENV))
    rows = [json.loads(l) for l in (out + "\n" + err).splitlines() if l.startswith('{"n_kv_max"')]
    tests = []
    for b in (1, a.batch):
        sel = [r for r in rows if r["pl"] == b][1:]  # drop the warm-up
        if not sel:
            continue
        tests.append({"name": f"tg{a.tg}@b{b}", "kind": "tg", "n_prompt": 1, "n_gen": a.tg, "batch": b,
                      "repetitions": len(sel), **stats([float(r["speed_tg"]) for r in sel])})
    extra = {k: rows[0].get(k) for k in ("n_kv_max", "flash_attn", "n_threads", "n_threads_batch")} if rows else {}
    return {"command": cmd, "wall_s": secs, **extra, "tests": tests}


def candle(binary, model_args, a):
    env = dict(ENV, RAYON_NUM_THREADS=str(a.threads))
    cmd = [binary, *model_args, "-p", str(a.pp), "-n", str(a.tg), "--batch", str(a.batch), "-r", str(a.reps),
           "--greedy", str(a.greedy)]
    out, err, secs = run(cmd, env=env)
    res = json.loads(out)
    res["command"] = cmd
    res["wall_s"] = secs
    return res


def bandwidth(script, a):
    out, err, secs = run([script, "--mib", str(a.bw_mib), "--passes", str(a.bw_passes), "--threads", f"1,{a.threads}"])
    res = json.loads(out)
    res["wall_s"] = secs
    return res


def roofline(bw, weights, threads, batch):
    """Decode ceiling = bandwidth / weight bytes per token. The headline bandwidth is the best of the
    read/copy/triad medians at `threads` threads (what the machine sustains); the others are kept."""
    at = {(r["kernel"], r["threads"]): r for r in bw["results"]}
    medians = [r["median_gbs"] for r in bw["results"] if r["threads"] == threads]
    best_pass = max(r["best_gbs"] for r in bw["results"] if r["threads"] == threads)
    read = at.get(("read", threads), {}).get("median_gbs")
    gbs = max(medians)
    out = {"bandwidth_gbs": {"headline": gbs, "headline_is": "max over read/copy/triad medians",
                             "read_median": read, "kernel_medians_min": min(medians),
                             "kernel_medians_max": gbs, "best_pass": best_pass, "threads": threads}}
    for w, info in weights.items():
        b = info["bytes"]
        out[w] = {
            "bytes_per_token": b,
            "tg_ts": gbs * 1e9 / b,
            "tg_ts_read_median": read * 1e9 / b if read else None,
            "tg_ts_range": [min(medians) * 1e9 / b, gbs * 1e9 / b],
            "tg_ts_best_pass": best_pass * 1e9 / b,
            # weights read once per step for all `batch` sequences; compute and KV traffic ignored
            f"tg_b{batch}_ts_weights_only": batch * gbs * 1e9 / b,
        }
    return out


# ------------------------------------------------------------------ machine info

def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


def machine_info(repo):
    lscpu = sh(["lscpu"])
    get = lambda k: next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith(k + ":")), None)
    flags = (get("Flags") or "").split()
    mem_kb = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:")), 0)
    commit = sh(["git", "-C", repo, "rev-parse", "--verify", "-q", "HEAD"]) or None  # None: no commits yet
    dirty = bool(sh(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"])) if commit else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": get("Model name"),
        "cpus": os.cpu_count(),
        "threads_per_core": get("Thread(s) per core"),
        "l3": get("L3 cache"),
        "hypervisor": get("Hypervisor vendor"),
        "simd": [x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if x in flags],
        "mem_total_gib": round(mem_kb / 1048576, 1),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "repo_commit": commit,
        "repo_dirty": dirty,
        "rustc": sh(["rustc", "--version"]),
        "cc": sh([ENV.get("CC", "cc"), "--version"]).splitlines()[0] if shutil.which(ENV.get("CC", "cc")) else None,
    }


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hf", help="HF-layout dir for candle f32/bf16 (config.json + *.safetensors)")
    ap.add_argument("--hf-origin", default="", help="where --hf came from (recorded)")
    ap.add_argument("-p", "--pp", type=int, default=512)
    ap.add_argument("-n", "--tg", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--greedy", type=int, default=16, help="candle correctness probe length (0: off)")
    ap.add_argument("--bw-mib", type=int, default=1024)
    ap.add_argument("--bw-passes", type=int, default=7)
    ap.add_argument("--wait-idle", type=int, default=0, metavar="S",
                    help="first wait up to S seconds for the 1-min load average to drop below --idle-load")
    ap.add_argument("--idle-load", type=float, default=0.5)
    ap.add_argument("--skip", action="append", default=[], choices=["llama", "candle", "bandwidth"])
    ap.add_argument("--only-weights", action="append", default=[], choices=["q4_1", "bf16", "f32"])
    a = ap.parse_args()

    repo = ENV["REPO_ROOT"]
    idle = wait_idle(a.wait_idle, a.idle_load) if a.wait_idle > 0 else None
    ggufs = {"q4_1": ENV["GGUF_Q4_1"], "bf16": ENV["GGUF_BF16"], "f32": ENV["GGUF_F32"]}
    weights = a.only_weights or ["q4_1", "bf16", "f32"]
    t_start = time.time()
    report = {
        "schema": "computepool.anchors/1",
        "model": "SmolLM2-135M-Instruct",
        "protocol": {
            "threads": a.threads, "n_prompt": a.pp, "n_gen": a.tg, "repetitions": a.reps, "batch": a.batch,
            "pp": f"pp{a.pp}: one forward over {a.pp} prompt tokens from an empty KV cache; t/s = {a.pp}/time",
            "tg": f"tg{a.tg}: {a.tg} single-token decode steps (llama-bench: from position 0; candle and "
                  f"llama-batched-bench: after a 1-token prefix); t/s = {a.tg}/time",
            "tg_batch": f"tg{a.tg}@b{a.batch}: {a.batch} sequences decoded together, aggregate t/s = "
                        f"{a.batch}*{a.tg}/time",
            "stats": "median/min/max over the repetitions, after a warm-up run",
        },
        "machine": machine_info(repo),
        "weights": {},
        "bandwidth": None,
        "roofline": {},
        "llama_cpp": {},
        "candle": {},
        "errors": [],
    }
    for w in weights:
        report["weights"][w] = {"gguf": ggufs[w], **bytes_per_token(gguf_tensor_bytes(ggufs[w]))}
    if a.hf:
        files = sorted(os.path.join(a.hf, f) for f in os.listdir(a.hf) if f.endswith(".safetensors"))
        st = safetensors_tensor_bytes(files)
        report["hf_dir"] = {"path": a.hf, "origin": a.hf_origin, "stored_dtype": sorted({t for t, _, _ in st.values()}),
                            **bytes_per_token(st)}

    def guarded(section, key, fn, *args):
        try:
            report[section][key] = fn(*args)
        except Exception as e:  # keep going: one failing anchor must not lose the others
            log(f"{section}/{key} failed: {e}")
            report["errors"].append({"section": section, "key": key, "error": str(e)})

    # bandwidth first: the machine is quietest before the compute-heavy runs
    if "bandwidth" not in a.skip:
        try:
            report["bandwidth"] = bandwidth(ENV["BENCH_DIR"] + "/bandwidth.sh", a)
        except Exception as e:
            report["errors"].append({"section": "bandwidth", "error": str(e)})

    if "llama" not in a.skip:
        bin_dir = ENV["LLAMA_BIN"]
        report["llama_cpp_build"] = {"bin_dir": bin_dir, "source": "PyPI sdist llama-cpp-python==0.3.36, vendor/llama.cpp",
                                     "cpu_features": ggml_cpu_features(bin_dir)}
        for w in weights:
            guarded("llama_cpp", w, llama_bench, os.path.join(bin_dir, "llama-bench"), ggufs[w], a)
            if a.batch > 1 and os.access(os.path.join(bin_dir, "llama-batched-bench"), os.X_OK):
                try:
                    bb = llama_batched(os.path.join(bin_dir, "llama-batched-bench"), ggufs[w], a)
                    report["llama_cpp"].setdefault(w, {"tests": []})["batched_bench"] = {k: v for k, v in bb.items() if k != "tests"}
                    report["llama_cpp"][w]["tests"] += bb["tests"]
                except Exception as e:
                    report["errors"].append({"section": "llama_cpp", "key": w + "/batched", "error": str(e)})

    if "candle" not in a.skip:
        cb = ENV["CANDLE_ANCHOR_BIN"]
        for w in weights:
            if w == "q4_1":
                guarded("candle", w, candle, cb, ["--gguf", ggufs[w]], a)
            elif a.hf:
                guarded("candle", w, candle, cb, ["--hf", a.hf, "--dtype", w], a)
            else:
                report["errors"].append({"section": "candle", "key": w, "error": "no HF-layout dir"})

    if report["bandwidth"]:
        report["roofline"] = roofline(report["bandwidth"], report["weights"], a.threads, a.batch)
    # correctness cross-check: candle on every weight format should pick the same greedy tokens for a
    # fixed prompt (Q4_1 may legitimately diverge after a few tokens; f32 vs bf16 where top-2 are close)
    greedy = {w: r["greedy"]["tokens"] for w, r in report["candle"].items() if r.get("greedy")}
    if greedy:
        ref = greedy.get("f32") or next(iter(greedy.values()))
        agree = {w: next((i for i, (x, y) in enumerate(zip(t, ref)) if x != y), len(ref)) for w, t in greedy.items()}
        report["checks"] = {"candle_greedy_tokens": greedy, "candle_greedy_agree_prefix_vs_f32": agree}
    report["machine"]["wait_idle"] = idle
    report["machine"]["load_during_runs"] = LOADS
    report["wall_s"] = time.time() - t_start

    # a compact table: every figure in one place
    summary = []
    for eng in ("llama_cpp", "candle"):
        for w, r in report[eng].items():
            for t in r.get("tests", []):
                summary.append({"engine": eng, "weights": w, "test": t["name"], "median_ts": round(t["median_ts"], 2),
                                "min_ts": round(t["min_ts"], 2), "max_ts": round(t["max_ts"], 2)})
    for w, r in report["roofline"].items():
        if w != "bandwidth_gbs":
            # median: at the best kernel's median GB/s; min: slowest kernel median; max: best single pass
            summary.append({"engine": "roofline", "weights": w, "test": f"tg{a.tg}",
                            "median_ts": round(r["tg_ts"], 2),
                            "min_ts": round(r["tg_ts_range"][0], 2), "max_ts": round(r["tg_ts_best_pass"], 2)})
    report["summary"] = summary

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, a.out)
    for s in summary:
        log(f"{s['engine']:9} {s['weights']:5} {s['test']:10} {s['median_ts']:9.1f} t/s  ({s['min_ts']:.1f}-{s['max_ts']:.1f})")
    log(f"wrote {a.out} in {report['wall_s']:.0f} s; errors: {len(report['errors'])}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
