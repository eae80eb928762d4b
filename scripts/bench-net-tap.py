#!/usr/bin/env python3
"""Frames per second from a guest into a kernel tap: `vireo net --tap` against DPDK's vhost PMD
forwarding to its tap PMD (`--forward-mode=io`), under the same DPDK virtio-user frontend
(dpdk-testpmd in `txonly`), interleaved A B A B.

    ./scripts/bench-net-tap.py [--rounds 3] [--seconds 10] [--sizes 64,1500] [--rings split,packed]

Each run makes a private network namespace with the tap in it (up, no address: the kernel counts
every frame and drops it), starts the backend inside it on core 1 and the frontend on core 0.
The rate is what reached the kernel: the tap's rx_packets over the run, after two seconds of
warm-up. The backend's CPU per frame (user and system time of the whole process, from
/proc/PID/stat: the tap write's kernel work runs on the backend's thread) is the cost on that
side. Prints one line per run and a JSON summary with the CPU model; exits non-zero if a run
moved nothing. Removes every namespace, socket and DPDK runtime directory it made.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIREO = os.path.join(ROOT, "target", "release", "vireo")
NS = f"vireo-bench-tap-{os.getpid()}"

# The process helpers of the DPDK comparison (starting and stopping a process group, the CPU
# model), shared rather than written again.
_spec = importlib.util.spec_from_file_location("bench_net", os.path.join(ROOT, "scripts", "bench-net.py"))
bench_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_net)
start, stop, cpu_model = bench_net.start, bench_net.stop, bench_net.cpu_model
TAP = "vbtap0"


def ns(*cmd):
    return ["ip", "netns", "exec", NS, *cmd]


def tap_rx():
    out = subprocess.run(ns("cat", f"/sys/class/net/{TAP}/statistics/rx_packets"), capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def cpu_ns(pid):
    """User and system time of process `pid` (every thread), in nanoseconds."""
    try:
        rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return (int(rest[11]) + int(rest[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def run_one(backend, size, ring, seconds, tmp):
    sock = os.path.join(tmp, "net.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        blog = open(os.path.join(tmp, f"backend-{backend}.log"), "w")
        if backend == "vireo":
            b = start(ns("taskset", "-c", "1", VIREO, "net", "--socket-path", sock, "--tap", TAP, "--poll",
                         "--threads", "1"), blog)
        else:
            b = start(ns("dpdk-testpmd", "--no-pci", "--no-huge", "-m", "512", "--file-prefix=vireo-bench-tb",
                         "-l", "0,1", "--main-lcore", "0", "--vdev", f"net_vhost0,iface={sock},queues=1",
                         "--vdev", f"net_tap0,iface={TAP}", "--", "--nb-cores=1", "--stats-period", "1",
                         "--forward-mode=io", "--total-num-mbufs=32768"), blog)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        vdev = f"net_virtio_user0,path={sock},queues=1" + (",packed_vq=1" if ring == "packed" else "")
        flog = open(os.path.join(tmp, "frontend.log"), "w")
        f = start(["dpdk-testpmd", "--no-pci", "--no-huge", "-m", "512", "--file-prefix=vireo-bench-tf", "-l", "0,1",
                   "--main-lcore", "1", "--vdev", vdev, "--", "--nb-cores=1", "--forward-mode=txonly",
                   f"--txpkts={size}", "--total-num-mbufs=32768", "--stats-period", "1"], flog)
        # The tap exists once the backend has made it (vireo at start, DPDK at its port's start).
        for _ in range(100):
            if subprocess.run(ns("ip", "link", "set", TAP, "up"), capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        time.sleep(2)
        # `ip netns exec` and `taskset` both exec: the backend runs as the started process.
        pid = b.pid
        r0, c0, t0 = tap_rx(), cpu_ns(pid), time.monotonic()
        time.sleep(seconds)
        r1, c1, t1 = tap_rx(), cpu_ns(pid), time.monotonic()
        stop(f)
        stop(b)
        flog.close()
        blog.close()
        frames = r1 - r0
        return frames / (t1 - t0), ((c1 - c0) / frames if frames else None)
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--rings", default="split,packed")
    a = ap.parse_args()
    if shutil.which("dpdk-testpmd") is None:
        sys.exit("dpdk-testpmd not found: apt-get install dpdk-dev")
    subprocess.run(["cargo", "build", "--release", "-p", "vireo"], cwd=ROOT, check=True)
    results = {}
    tmp = tempfile.mkdtemp(prefix="vireo-bench-tap-")
    failed = False
    try:
        for r in range(a.rounds):
            for size in a.sizes.split(","):
                for ring in a.rings.split(","):
                    for backend in ("vireo", "dpdk"):
                        pps, cpu = run_one(backend, int(size), ring, a.seconds, tmp)
                        failed |= pps == 0
                        key = f"{size}B {ring}"
                        e = results.setdefault(key, {}).setdefault(backend, {"mpps": [], "cpu_ns_per_frame": []})
                        e["mpps"].append(pps / 1e6)
                        e["cpu_ns_per_frame"].append(cpu)
                        cpu_s = f"{cpu:7.0f} ns CPU per frame" if cpu else "no frames"
                        print(f"round {r + 1}: {key:12} {backend:5} {pps / 1e6:6.3f} Mpps, {cpu_s}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for prefix in ("vireo-bench-tb", "vireo-bench-tf"):
            shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    summary = {"cpu": cpu_model(), "seconds": a.seconds, "rounds": a.rounds, "results": {}}
    for k, v in results.items():
        mv, md = statistics.median(v["vireo"]["mpps"]), statistics.median(v["dpdk"]["mpps"])
        cv = statistics.median([c for c in v["vireo"]["cpu_ns_per_frame"] if c] or [0])
        cd = statistics.median([c for c in v["dpdk"]["cpu_ns_per_frame"] if c] or [0])
        summary["results"][k] = {"vireo": v["vireo"], "dpdk": v["dpdk"], "vireo_mpps_median": mv,
                                 "dpdk_mpps_median": md, "ratio": mv / md if md else None,
                                 "vireo_cpu_ns_per_frame": cv, "dpdk_cpu_ns_per_frame": cd}
    print(json.dumps(summary, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
