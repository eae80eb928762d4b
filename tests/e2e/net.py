"""End-to-end tests of `vireo net`: a Linux guest under QEMU (TCG) whose network card is served
by `vireo net --tap`, the tap on a bridge in a private network namespace of the host (never on
the host's own network), a peer (an HTTP server, `peer.py`) in that namespace.

Each test makes its own namespace, taps, `vireo net` processes and QEMU, and removes them all.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from common import CACHE, VIREO, Qmp

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
MAC = "52:54:00:12:34:56"
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")

GUEST_NET = r'''
IF=$(ls /sys/class/net | grep -v '^lo$' | head -1)
[ -n "$IF" ] || { echo "GUEST: no network interface"; exit 1; }
ip link set lo up
ip link set $IF up
ip addr add ''' + GUEST_IP + r'''/24 dev $IF
echo "GUEST: $IF features=$(cat /sys/class/net/$IF/device/features) queues=$(ls /sys/class/net/$IF/queues | tr '\n' ' ')"
i=0
until ping -c 1 -W 1 ''' + HOST_IP + r''' >/dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 30 ] || { echo "GUEST: no answer to ping"; exit 1; }
done
ping -c 5 -i 0.2 -W 2 ''' + HOST_IP + r''' > /tmp/ping || { echo "GUEST: ping lost frames"; cat /tmp/ping; exit 1; }
echo "GUEST: PING $(grep -o '[0-9]* packets received' /tmp/ping)"
'''

GUEST_TRANSFER = r'''
wget -q -O /tmp/down http://''' + HOST_IP + r''':8000/data || { echo "GUEST: download failed"; exit 1; }
echo "GUEST: DOWN_SHA=$(sha256sum /tmp/down | cut -d' ' -f1) $(wc -c < /tmp/down) bytes"
# busybox wget posts its file as a string (up to the first zero byte): random bytes in base64,
# 32 MiB of them.
dd if=/dev/urandom bs=1M count=24 status=none | base64 > /tmp/up
echo "GUEST: UP_SHA=$(sha256sum /tmp/up | cut -d' ' -f1) $(wc -c < /tmp/up) bytes"
wget -q --post-file=/tmp/up -O /tmp/ack http://''' + HOST_IP + r''':8000/upload || { echo "GUEST: upload failed"; exit 1; }
echo "GUEST: UP_ACK=$(cat /tmp/ack)"
'''


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


class Netns:
    """A network namespace with a bridge at HOST_IP and the peer server on it."""

    def __init__(self, name):
        self.name = f"vireo-{name}-{os.getpid()}"
        self.dir = tempfile.mkdtemp(prefix=f"vireo-e2e-{name}.")
        sh(f"ip netns add {self.name}")
        self.run("ip link set lo up")
        self.run("ip link add br0 type bridge")
        self.run(f"ip addr add {HOST_IP}/24 dev br0")
        self.run("ip link set br0 up")
        self.peer_lines = []
        self.peer = subprocess.Popen(["ip", "netns", "exec", self.name, "python3", PEER, HOST_IP, "8000"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read_peer, daemon=True).start()
        deadline = time.monotonic() + 20
        while not any("PEER listening" in l for l in self.peer_lines):
            if time.monotonic() > deadline or self.peer.poll() is not None:
                raise RuntimeError("the peer did not start: " + " | ".join(self.peer_lines))
            time.sleep(0.05)

    def _read_peer(self):
        for line in self.peer.stdout:
            self.peer_lines.append(line.rstrip())

    def peer_value(self, key):
        for l in reversed(self.peer_lines):
            if l.startswith(f"PEER {key}="):
                return l.split("=", 1)[1]
        return None

    def run(self, cmd, check=True):
        return sh(f"ip netns exec {self.name} {cmd}", check)

    def persistent_tap(self, tap, queues):
        """A tap made as a user makes one (`ip tuntap ... multi_queue vnet_hdr`), on the bridge:
        it outlives the vireo processes that attach to it."""
        self.run(f"ip tuntap add dev {tap} mode tap multi_queue vnet_hdr")
        self.bridge(tap)

    def bridge(self, tap):
        self.run(f"ip link set {tap} master br0")
        self.run(f"ip link set {tap} up")

    def close(self):
        if self.peer.poll() is None:
            self.peer.terminate()
            try:
                self.peer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.peer.kill()
        sh(f"ip netns delete {self.name}", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class VireoNet:
    """`vireo net --tap TAP` in the namespace."""

    def __init__(self, ns, name, tap, queues=2, extra=()):
        self.ns, self.tap, self.queues, self.extra = ns, tap, queues, list(extra)
        self.sock = os.path.join(ns.dir, f"{name}.sock")
        self.log_path = os.path.join(ns.dir, f"{name}.log")
        self.log_file = open(self.log_path, "a")
        self.proc = None
        self.start()

    def start(self):
        env = dict(os.environ, VIREO_RETIRE="protnone", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns.name, VIREO, "net", "--socket-path", self.sock, "--tap", self.tap,
             "--queue-pairs", str(self.queues), *self.extra],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vireo net did not start: {self.log()}")
            time.sleep(0.05)

    def kill(self):
        """SIGKILL: no clean-up at all; the socket file stays behind."""
        self.proc.kill()
        self.proc.wait()
        os.unlink(self.sock)

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        return open(self.log_path).read()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log_file.closed:
            self.log_file.close()


class Guest:
    """A QEMU guest whose virtio-net card is served over vhost-user at `sock`."""

    def __init__(self, name, script, sock, workdir, queues=2, device_opts="", qemu_args=(), mem="512M", cmdline=""):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"vireo-e2e-{name}.", dir=workdir)
        self.qmp_sock = os.path.join(self.dir, "qmp.sock")
        tdir = os.path.join(self.dir, "t")
        os.mkdir(tdir)
        with open(os.path.join(tdir, "test.sh"), "w") as f:
            f.write(script)
        os.chmod(os.path.join(tdir, "test.sh"), 0o755)
        cpio = subprocess.run("echo test.sh | cpio -o -H newc --quiet | gzip -1", shell=True, cwd=tdir, check=True,
                              stdout=subprocess.PIPE).stdout
        self.initrd = os.path.join(self.dir, "initrd.img")
        with open(self.initrd, "wb") as f:
            f.write(open(os.path.join(CACHE, "initrd.img"), "rb").read() + cpio)
        self.lines = []
        self.t0 = time.monotonic()
        vectors = 2 * queues + 2
        self.qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-machine", "q35", "-smp", "2", "-m", mem,
             "-object", f"memory-backend-memfd,id=mem0,size={mem},share=on", "-numa", "node,memdev=mem0",
             "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
             "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
             "-chardev", f"socket,id=vu0,path={sock},reconnect-ms=200",
             "-netdev", f"vhost-user,id=net0,chardev=vu0,queues={queues}",
             "-device", f"virtio-net-pci,netdev=net0,mac={MAC},mq=on,vectors={vectors}{device_opts}",
             *qemu_args,
             "-kernel", os.path.join(CACHE, "vmlinux"), "-initrd", self.initrd,
             "-append", f"console=ttyS0 panic=-1 quiet {cmdline}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.qemu.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "GUEST" in line:
                print(f"  [{self.name} {time.monotonic() - self.t0:6.1f}s] {line}", flush=True)

    def send(self, text):
        self.qemu.stdin.write(text.encode() + b"\n")
        self.qemu.stdin.flush()

    def wait_line(self, text, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in l for l in self.lines):
                return True
            if self.qemu.poll() is not None:
                break
            time.sleep(0.1)
        return any(text in l for l in self.lines)

    def value(self, key):
        for l in reversed(self.lines):
            if f"GUEST: {key}=" in l:
                return l.split(f"GUEST: {key}=", 1)[1].split()[0]
        return None

    def finish(self, timeout=180):
        try:
            self.qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.qemu.kill()
            self.qemu.wait()
        return any("GUEST-RESULT: PASS" in l for l in self.lines)

    def close(self):
        if self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def transfers_match(ns, g):
    """Both 32 MiB transfers arrived whole: (ok, description)."""
    down, up, ack = g.value("DOWN_SHA"), g.value("UP_SHA"), g.value("UP_ACK")
    sent, got = ns.peer_value("data"), ns.peer_value("upload")
    ok = down is not None and down == sent and up is not None and up == ack == got
    if down is None or up is None:
        return False, "the transfers did not run"
    return ok, f"download {'matches' if down == sent else 'DIFFERS'}, upload {'matches' if up == got else 'DIFFERS'}"


def test_net(packed=False):
    """Ping and 32 MiB over TCP in each direction through `vireo net --tap`, two queue pairs; the
    tap made by vireo itself (and put on the bridge by the test)."""
    name = "net-packed" if packed else "net"
    ns = Netns(name)
    v = g = None
    try:
        v = VireoNet(ns, "vireo", "vtap0")
        ns.bridge("vtap0")
        script = "#!/bin/sh\n" + GUEST_NET + GUEST_TRANSFER
        g = Guest(name, script, v.sock, ns.dir, device_opts=",packed=on" if packed else "")
        ok = g.finish()
        same, why = transfers_match(ns, g)
        warn = v.log().count("WARN")
        feats = next((l.split("features=")[1].split()[0] for l in g.lines if "features=" in l), "?")
        packed_ok = not packed or (len(feats) > 34 and feats[34] == "1")
        good = ok and same and warn == 0 and packed_ok
        detail = "" if good else " | guest: " + " | ".join(g.lines[-4:])
        v.close()
        detail += "" if good else " | vireo: " + " | ".join(v.log().splitlines()[-3:])
        return good, (
            f"guest {'PASS' if ok else 'FAIL'}, {why}, packed negotiated: {packed_ok if packed else 'no (split)'}, "
            f"vireo warnings: {warn}{detail}")
    finally:
        for x in (g, v):
            if x is not None:
                x.close()
        ns.close()


def test_net_migration():
    """Live migration between two QEMUs, each with its own `vireo net` on its own tap (both on
    the bridge), while the guest downloads a 64 MiB stream.

    The frames that prove the dirty log are those the device writes into pages QEMU has already
    sent: the stream runs through the first pass over RAM, then the guest stops the downloading
    process (SIGSTOP), so that what arrives next stays in the socket's receive queue, in receive
    buffers only the device wrote, until the process resumes on the destination. A receive
    buffer write missing from the log leaves those pages stale on the destination, and the
    stream's checksum says so (with the buffer writes' logging removed, it does). The guest
    cannot announce itself (guest_announce=off), so QEMU asks the destination's backend for a
    RARP (SEND_RARP)."""
    ns = Netns("net-mig")
    src = dst = gs = gd = None
    try:
        ns.persistent_tap("vtsrc", 2)
        ns.persistent_tap("vtdst", 2)
        src = VireoNet(ns, "src", "vtsrc")
        dst = VireoNet(ns, "dst", "vtdst")
        script = "#!/bin/sh\n" + GUEST_NET + r'''
# Room for what arrives while the download is stopped, so that it stays in the receive buffers
# the device wrote (a full receive queue is collapsed: copied by the CPU, into pages the guest's
# own writes dirty).
sysctl -qw net.ipv4.tcp_rmem="4096 131072 134217728"
sysctl -qw net.core.rmem_max=134217728
# Keeps migration from converging until the download is stopped: rewrites a 4 MiB buffer.
dd if=/dev/urandom of=/dev/null bs=4M count=100000000 2>/dev/null & D=$!
wget -q -O /tmp/stream http://''' + HOST_IP + r''':8000/stream & W=$!
echo "GUEST: READY"
read stop
kill -STOP $W
sleep 3
kill $D
# The receive queue's bytes (the socket to the peer's port 8000, 0x1F40): what waits in the
# device-written buffers.
Q=$(awk '$3 ~ /:1F40$/ {split($5, q, ":"); print q[2]}' /proc/net/tcp | head -1)
echo "GUEST: STOPPED rxq=$((0x${Q:-0}))"
read cont
kill -CONT $W
wait $W || { echo "GUEST: stream failed"; exit 1; }
echo "GUEST: STREAM_SHA=$(sha256sum /tmp/stream | cut -d' ' -f1) $(wc -c < /tmp/stream) bytes"
''' + GUEST_TRANSFER
        mig = os.path.join(ns.dir, "mig.sock")
        opts = ",guest_announce=off"
        # Pages are not zeroed when the guest allocates receive buffers (its own writes would
        # dirty them after the device's and hide a write missing from the log).
        cmdline = "init_on_alloc=0 init_on_free=0"
        gs = Guest("net-mig-src", script, src.sock, ns.dir, device_opts=opts, cmdline=cmdline)
        gd = Guest("net-mig-dst", script, dst.sock, ns.dir, device_opts=opts, qemu_args=["-incoming", f"unix:{mig}"],
                   cmdline=cmdline)
        if not gs.wait_line("READY"):
            return False, "guest never got ready: " + " | ".join(gs.lines[-3:])
        qs = Qmp(gs.qmp_sock)
        Qmp(gd.qmp_sock)
        # Held back (a 1 ms downtime limit) while the stream runs through the first pass.
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20, "downtime-limit": 1})
        qs.cmd("migrate", uri=f"unix:{mig}")
        t = time.monotonic()
        while time.monotonic() - t < 120:
            info = qs.cmd("query-migrate")
            if info.get("status") not in ("setup", "active") or info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                break
            time.sleep(0.05)
        first_pass = time.monotonic() - t
        # Slowed to a trickle while the guest stops its download: the pages the device writes
        # now stay to be sent again (or not, without the log) after the ones sent before.
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
        gs.send("stop")
        if not gs.wait_line("STOPPED", timeout=60):
            return False, "the guest did not stop its download: " + " | ".join(gs.lines[-3:])
        early = qs.cmd("query-migrate").get("status")
        if early != "active":
            return False, f"migration {early} before the download was stopped (test inconclusive)"
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 300})
        status = ""
        while time.monotonic() - t < 240:
            info = qs.cmd("query-migrate")
            status = info.get("status", "")
            if status in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
        if status != "completed":
            return False, f"migration {status}"
        downtime = info.get("downtime", "?")
        try:
            qs.cmd("quit")
        except Exception:
            pass
        gd.send("cont")
        ok = gd.finish()
        stream_ok = gd.value("STREAM_SHA") is not None and gd.value("STREAM_SHA") == ns.peer_value("stream")
        same, why = transfers_match(ns, gd)
        logged = "dirty logging (VHOST_F_LOG_ALL) on=true" in src.log()
        rarp = "RARP sent" in dst.log()
        warn = (src.log() + dst.log()).count("WARN")
        good = ok and stream_ok and same and logged and rarp and warn == 0
        if not good:
            why += (" | guest: " + " | ".join(gd.lines[-5:]) + " | dst vireo: "
                    + " | ".join(dst.log().splitlines()[-6:]))
        return good, (f"guest {'PASS' if ok else 'FAIL'} on the destination, stream "
                      f"{'whole' if stream_ok else 'DIFFERS'}, {why}; first pass {first_pass:.1f}s, "
                      f"downtime {downtime} ms; source logged: "
                      f"{logged}; RARP on the destination: {rarp}; vireo warnings: {warn}")
    finally:
        for x in (gs, gd, src, dst):
            if x is not None:
                x.close()
        ns.close()


def test_net_reconnect():
    """SIGKILL of `vireo net` during a 64 MiB download, and a restart on the same socket and tap:
    QEMU reconnects (reconnect-ms), the link comes back, TCP resends what was lost in flight, and
    the download completes whole; twice."""
    ns = Netns("net-rc")
    v = g = None
    try:
        ns.persistent_tap("vtap0", 2)
        v = VireoNet(ns, "vireo", "vtap0")
        script = "#!/bin/sh\n" + GUEST_NET + r'''
echo "GUEST: READY"
wget -q -O /tmp/stream http://''' + HOST_IP + r''':8000/stream || { echo "GUEST: stream failed"; exit 1; }
echo "GUEST: STREAM_SHA=$(sha256sum /tmp/stream | cut -d' ' -f1) $(wc -c < /tmp/stream) bytes"
''' + GUEST_TRANSFER
        g = Guest("net-rc", script, v.sock, ns.dir)
        if not g.wait_line("READY"):
            return False, "guest never got ready: " + " | ".join(g.lines[-3:])
        kills = 0
        for _ in range(2):
            time.sleep(2)
            if any("STREAM_SHA" in l for l in g.lines):
                break
            v.kill()
            kills += 1
            time.sleep(0.5)
            v.start()
        ok = g.finish()
        stream_ok = g.value("STREAM_SHA") is not None and g.value("STREAM_SHA") == ns.peer_value("stream")
        same, why = transfers_match(ns, g)
        good = ok and stream_ok and same and kills == 2
        detail = "" if good else (" | guest: " + " | ".join(g.lines[-5:]) + " | vireo: "
                                  + " | ".join(v.log().splitlines()[-6:]))
        return good, (
            f"guest {'PASS' if ok else 'FAIL'}, {kills} SIGKILLs during the stream, stream "
            f"{'whole' if stream_ok else 'DIFFERS'}, {why}{detail}")
    finally:
        for x in (g, v):
            if x is not None:
                x.close()
        ns.close()


NET_TESTS = {"net": test_net, "net_packed": lambda: test_net(packed=True), "net_migration": test_net_migration,
             "net_reconnect": test_net_reconnect}
