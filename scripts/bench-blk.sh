#!/usr/bin/env bash
# Drives vhost-user-blk backends with `vireo bench` on a null device: 4 KiB random reads at
# iodepth 1, 32 and 128, on one and two queues; prints one JSON line per run and a table with
# the ratios. Backends: `vireo blk --null`, the same with `--poll`, and qemu-storage-daemon
# (driver=null-co). Runs are interleaved (Vireo, Vireo --poll, qsd, ...) and repeated (ROUNDS, default 3) so that drift on two
# shared cores spreads over both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-1G}
# MODE=null: both serve a null device (the data path alone). MODE=file: both serve the same
# image file through io_uring with O_DIRECT (vireo --direct; qsd aio=io_uring,cache.direct=on).
MODE=${MODE:-null}
# DRIVER_POLL=1: the driver polls the used rings instead of sleeping on call eventfds (`vireo
# bench --poll`), the same for every backend.
DRIVER_POLL=${DRIVER_POLL:-0}
driver_flags=()
[ "$DRIVER_POLL" = 1 ] && driver_flags=(--poll)
command -v qemu-storage-daemon >/dev/null || { echo "bench-blk: qemu-storage-daemon is needed (qemu-utils)" >&2; exit 1; }
cargo build --release -p vireo >&2
dir=$(mktemp -d /tmp/vireo-bench-blk.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
if [ "$MODE" = file ]; then
  SIZE=${FILE_SIZE:-256M}
  # Written for real, so that reads hit allocated blocks rather than holes.
  dd if=/dev/zero of="$dir/disk.img" bs=1M count=$(( $(numfmt --from=iec "$SIZE") >> 20 )) oflag=direct status=none
fi

start_qsd() { # queues -> prints pid; socket at $dir/qsd-$1.sock
  local q=$1 sock="$dir/qsd-$1.sock"
  local blockdev="driver=null-co,node-name=n0,size=$(numfmt --from=iec "$SIZE")"
  [ "$MODE" = file ] && blockdev="driver=file,node-name=n0,filename=$dir/disk.img,aio=io_uring,cache.direct=on"
  qemu-storage-daemon \
    --blockdev "$blockdev" \
    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$q" \
    >"$dir/qsd-$q.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { cat "$dir/qsd-$q.log" >&2; exit 1; }
  echo "$pid"
}

start_vireo() { # queues [extra flag] -> prints pid; socket at $dir/vireo$2-$1.sock
  local q=$1 flag=${2:-} sock="$dir/vireo${2:-}-$1.sock"
  local what=(--null "$SIZE")
  [ "$MODE" = file ] && what=(--image "$dir/disk.img" --direct)
  ./target/release/vireo blk --socket-path "$sock" "${what[@]}" --num-queues "$q" $flag >"$dir/vireo$flag-$q.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { cat "$dir/vireo-$q.log" >&2; exit 1; }
  echo "$pid"
}

results="$dir/results.jsonl"
for round in $(seq "$ROUNDS"); do
  for q in 1 2; do
    vpid=$(start_vireo "$q"); pids+=("$vpid")
    ppid_=$(start_vireo "$q" --poll); pids+=("$ppid_")
    qpid=$(start_qsd "$q"); pids+=("$qpid")
    for depth in 1 32 128; do
      for backend in vireo vireo-poll qsd; do
        case $backend in
          vireo) sock="$dir/vireo-$q.sock"; pid=$vpid; name=vireo ;;
          vireo-poll) sock="$dir/vireo--poll-$q.sock"; pid=$ppid_; name="vireo --poll" ;;
          *) sock="$dir/qsd-$q.sock"; pid=$qpid; name=qemu-storage-daemon ;;
        esac
        ./target/release/vireo bench --socket-path "$sock" --rw randread --bs 4k --size "$SIZE" "${driver_flags[@]}" \
          --iodepth "$depth" --numjobs "$q" --runtime "$RUNTIME" --backend-pid "$pid" --json |
          python3 -c "import json,sys; d=json.load(sys.stdin); d['backend']='$name'; d['round']=$round; print(json.dumps(d))" |
          tee -a "$results"
      done
    done
    kill "$vpid" "$ppid_" "$qpid"; wait "$vpid" "$ppid_" "$qpid" 2>/dev/null || true
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r['backend'], r['numjobs'], r['iodepth']) for r in rows})
print(f"{'backend':22} {'queues':>6} {'depth':>5} {'IOPS (median; runs)':>40} {'p50 us':>7} {'p99 us':>7} {'backend ns/IO':>13}")
meds = {}
for k in keys:
    rs = [r for r in rows if (r['backend'], r['numjobs'], r['iodepth']) == k]
    iops = [round(r['iops']) for r in rs]
    med = lambda f: statistics.median(f(r) for r in rs)
    meds[k] = (statistics.median(iops), med(lambda r: r['backend_cpu_ns_per_io'] or 0))
    print(f"{k[0]:22} {k[1]:>6} {k[2]:>5} {statistics.median(iops):>10.0f} {str(iops):>29} "
          f"{med(lambda r: r['lat_ns']['p50'])/1000:>7.1f} {med(lambda r: r['lat_ns']['p99'])/1000:>7.1f} "
          f"{meds[k][1]:>13.0f}")
print()
print(f"{'backend':14} {'queues':>6} {'depth':>5} {'IOPS / qsd':>11} {'backend CPU per I/O / qsd':>26}")
for (b, q, d), (iops, cpu) in sorted(meds.items()):
    other = meds.get(('qemu-storage-daemon', q, d))
    if b.startswith('vireo') and other:
        print(f"{b:14} {q:>6} {d:>5} {iops / other[0]:>11.2f} {cpu / other[1] if other[1] else float('nan'):>26.2f}")
PY
