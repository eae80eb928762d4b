#!/usr/bin/env python3
"""A/B of two builds of `vireo blk` (this checkout's and another's, e.g. a `git worktree` of an
older commit), driven by this checkout's `vireo bench` on a null device, interleaved A B A B.

    ./scripts/bench-blk-ab.py --base ../base [--rounds 5] [--runtime 5] [--iodepth 1,32,128]
                              [--ring split,packed] [--poll]

Both builds must be built (`cargo build --release -p vireo` in each). Prints one line per run and
a JSON summary with the CPU model: per case, the IOPS of each run, their medians and the ratio
(this checkout / base).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run_one(backend, driver, ring, depth, runtime, poll, tmp):
    sock = os.path.join(tmp, "ab.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    args = [backend, "blk", "--null", "1G", "--socket-path", sock]
    if poll:
        args.append("--poll")
    srv = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        out = subprocess.run([driver, "bench", "--socket-path", sock, "--rw", "randread", "--bs", "4k",
                              "--iodepth", str(depth), "--runtime", str(runtime), "--ring", ring, "--json"],
                             capture_output=True, text=True, timeout=runtime + 60)
        if out.returncode != 0:
            sys.exit(f"vireo bench failed: {out.stderr.strip()}")
        return json.loads(out.stdout.strip().splitlines()[-1])["iops"]
    finally:
        srv.terminate()
        srv.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the other checkout (its target/release/vireo)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--iodepth", default="1,32,128")
    ap.add_argument("--ring", default="split,packed")
    ap.add_argument("--poll", action="store_true", help="busy-polled workers (vireo blk --poll)")
    a = ap.parse_args()
    ours = os.path.join(ROOT, "target", "release", "vireo")
    base = os.path.join(os.path.abspath(a.base), "target", "release", "vireo")
    for b in (ours, base):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b}: not built (cargo build --release -p vireo)")
    cases = [(r, int(d)) for r in a.ring.split(",") for d in a.iodepth.split(",")]
    runs = {f"{r} depth {d}": {"this": [], "base": []} for r, d in cases}
    with tempfile.TemporaryDirectory(prefix="vireo-ab-") as tmp:
        for rnd in range(1, a.rounds + 1):
            for ring, depth in cases:
                key = f"{ring} depth {depth}"
                for name, backend in (("base", base), ("this", ours)) if rnd % 2 else (("this", ours), ("base", base)):
                    iops = run_one(backend, ours, ring, depth, a.runtime, a.poll, tmp)
                    runs[key][name].append(iops)
                    print(f"round {rnd}: {key:18} {name:4} {iops / 1e3:8.1f} kIOPS", flush=True)
    summary = {"cpu": cpu_model(), "rounds": a.rounds, "runtime_s": a.runtime, "poll": a.poll, "cases": {}}
    for key, r in runs.items():
        t, b = statistics.median(r["this"]), statistics.median(r["base"])
        summary["cases"][key] = {"this_iops": r["this"], "base_iops": r["base"], "this_median": t,
                                 "base_median": b, "ratio": round(t / b, 3) if b else None}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
