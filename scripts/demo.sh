#!/usr/bin/env bash
# Vireo's main job: `vireo blk` serves a disk image over vhost-user-blk to a Linux guest booted
# by QEMU (TCG), the guest writes and reads patterns on it with O_DIRECT and through its page
# cache, and the host checks the image. Installs what it needs on Debian 12 (QEMU from
# bookworm-backports, busybox-static, the Debian guest kernel, unpacked, not installed).
# Scratch and cached downloads live in target/demo. `./scripts/demo.sh memory` runs the
# invalidation-protocol demo instead (`vireo memory-demo`), which needs nothing but Rust.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = memory ]; then
  shift
  cargo build --release -p vireo
  exec ./target/release/vireo memory-demo "$@"
fi
CACHE=${VIREO_DEMO_CACHE:-$ROOT/target/demo}
mkdir -p "$CACHE"
say() { printf '\n== %s\n' "$*"; }

ensure_tools() {
  local need=()
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu)
  # grep without -q reads all its input: an early exit would SIGPIPE busybox under pipefail.
  [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x insmod >/dev/null || need+=(busybox)
  command -v cpio >/dev/null || need+=(cpio)
  [ ${#need[@]} -eq 0 ] && return
  say "installing ${need[*]} (Debian packages; QEMU from bookworm-backports)"
  if [ ! -f /etc/apt/sources.list.d/bookworm-backports.sources ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d; then
    local uri
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uri" > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
  apt-get update -qq
  # bookworm's own QEMU 7.2 would replace the backports qemu-utils (qemu-storage-daemon 10).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-utils
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static cpio kmod
}

ensure_kernel() {
  [ -f "$CACHE/vmlinux" ] && [ -f "$CACHE/modules/virtio_net.ko" ] && return
  say "fetching the Debian guest kernel"
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || { apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
  rm -rf "$CACHE/kpkg" && mkdir -p "$CACHE/kpkg"
  # apt drops privileges to _apt for downloads: let it write here.
  chmod 0777 "$CACHE/kpkg"
  (cd "$CACHE/kpkg" && apt-get download -qq "$pkg" && dpkg -x ./*.deb root)
  local kver=${pkg#linux-image-}
  # QEMU boots the uncompressed ELF through its PVH entry: no real-mode setup, no decompressor.
  python3 - "$CACHE/kpkg/root/boot/vmlinuz-$kver" "$CACHE/vmlinux" <<'PY'
import lzma, sys
blob = open(sys.argv[1], "rb").read()
start = blob.find(b"\xfd7zXZ\x00")
open(sys.argv[2], "wb").write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[start:]))
PY
  rm -rf "$CACHE/modules" && mkdir -p "$CACHE/modules"
  local m="$CACHE/kpkg/root/lib/modules/$kver/kernel"
  : > "$CACHE/modules/order"
  # No modprobe in the guest: load in dependency order.
  for mod in drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_modern_dev.ko \
             drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
             net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko; do
    if [ -f "$m/$mod" ]; then cp "$m/$mod" "$CACHE/modules/"; basename "$mod" >> "$CACHE/modules/order"; fi
  done
  rm -rf "$CACHE/kpkg"
}

build_initramfs() {
  say "building the guest's initramfs"
  local r="$CACHE/initramfs"
  rm -rf "$r" && mkdir -p "$r"/{bin,proc,sys,dev,tmp,lib/modules}
  cp /bin/busybox "$r/bin/busybox"
  cp "$CACHE"/modules/* "$r/lib/modules/"
  cat > "$r/init" <<'GUEST'
#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mount -t ramfs ramfs /tmp
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m; done
t() { cut -d' ' -f1 /proc/uptime; }
rate() { awk -v a=$1 -v b=$2 -v mib=$3 'BEGIN{d=b-a; if (d<=0) d=0.01; printf "%.1f MiB/s", mib/d}'; }
run() {
  [ -b /dev/vda ] || { echo "GUEST: no /dev/vda"; return 1; }
  echo "GUEST: /dev/vda is $(blockdev --getsize64 /dev/vda) bytes, $(ls /sys/block/vda/mq | wc -l) queues"
  dd if=/dev/urandom of=/tmp/pattern bs=1M count=32 status=none
  P=$(sha256sum /tmp/pattern | cut -d' ' -f1)
  echo "GUEST: PATTERN_SHA256=$P"
  a=$(t); dd if=/tmp/pattern of=/dev/vda bs=1M oflag=direct conv=fsync status=none; b=$(t)
  R=$(dd if=/dev/vda bs=1M count=32 iflag=direct status=none | sha256sum | cut -d' ' -f1); c=$(t)
  echo "GUEST: 1 MiB O_DIRECT: write $(rate $a $b 32), read $(rate $b $c 32)"
  [ "$P" = "$R" ] || { echo "GUEST: O_DIRECT read-back MISMATCH"; return 1; }
  a=$(t); dd if=/tmp/pattern of=/dev/vda bs=4k seek=16384 oflag=direct status=none; b=$(t)
  R=$(dd if=/dev/vda bs=4k skip=16384 count=8192 iflag=direct status=none | sha256sum | cut -d' ' -f1); c=$(t)
  echo "GUEST: 4 KiB O_DIRECT: write $(rate $a $b 32), read $(rate $b $c 32)"
  [ "$P" = "$R" ] || { echo "GUEST: 4 KiB read-back MISMATCH"; return 1; }
  dd if=/tmp/pattern of=/dev/vda bs=64k seek=1024 status=none; sync; echo 3 > /proc/sys/vm/drop_caches
  R=$(dd if=/dev/vda bs=64k skip=1024 count=512 status=none | sha256sum | cut -d' ' -f1)
  [ "$P" = "$R" ] || { echo "GUEST: buffered read-back MISMATCH"; return 1; }
  echo "GUEST: buffered write + read through the page cache: match"
}
# An end-to-end test appends its own /test.sh (tests/e2e/run.py); the demo runs `run`.
if [ -x /test.sh ]; then ok() { /test.sh; }; else ok() { run; }; fi
if ok; then echo "GUEST-RESULT: PASS"; else echo "GUEST-RESULT: FAIL"; fi
sync; poweroff -f
GUEST
  chmod +x "$r/init"
  (cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initrd.img"
}

ensure_tools
ensure_kernel
build_initramfs
say "building vireo"
cargo build --release -p vireo 2>&1 | tail -1
# `demo.sh --prepare`: stop here (tests/e2e/run.py uses the tools, kernel and initramfs).
[ "${1:-}" = --prepare ] && exit 0

RUN=$(mktemp -d /tmp/vireo-demo.XXXXXX)
VIREO_PID=
cleanup() { [ -n "$VIREO_PID" ] && kill "$VIREO_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT
truncate -s 256M "$RUN/disk.img"
say "starting vireo blk on a 256 MiB image (2 queues; retired guest memory PROT_NONE)"
VIREO_RETIRE=protnone RUST_LOG=${RUST_LOG:-info} ./target/release/vireo blk --socket-path "$RUN/vhost.sock" \
  --image "$RUN/disk.img" --num-queues 2 --serial vireo-demo > "$RUN/vireo.log" 2>&1 &
VIREO_PID=$!
for _ in $(seq 100); do [ -S "$RUN/vhost.sock" ] && break; sleep 0.05; done
[ -S "$RUN/vhost.sock" ] || { cat "$RUN/vireo.log"; exit 1; }

say "booting a Linux guest under QEMU (TCG) with its disk on vireo"
start=$(date +%s.%N)
timeout 300 qemu-system-x86_64 -accel tcg -cpu max -machine q35 -smp 2 -m 512M \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -nodefaults -no-user-config -display none -serial stdio -no-reboot \
  -chardev socket,id=vu0,path="$RUN/vhost.sock" -device vhost-user-blk-pci,chardev=vu0,num-queues=2 \
  -kernel "$CACHE/vmlinux" -initrd "$CACHE/initrd.img" -append "console=ttyS0 panic=-1 quiet" \
  < /dev/null | tee "$RUN/guest.log" | grep --line-buffered GUEST || true
end=$(date +%s.%N)

say "checking the image on the host"
P=$(sed -n 's/.*PATTERN_SHA256=\([0-9a-f]*\).*/\1/p' "$RUN/guest.log")
H1=$(head -c 32M "$RUN/disk.img" | sha256sum | cut -d' ' -f1)
H2=$(dd if="$RUN/disk.img" bs=4k skip=16384 count=8192 status=none | sha256sum | cut -d' ' -f1)
H3=$(dd if="$RUN/disk.img" bs=64k skip=1024 count=512 status=none | sha256sum | cut -d' ' -f1)
echo "host image at 0, 64 MiB and 64 MiB (buffered): $H1 $H2 $H3"
echo "guest pattern:                                 $P"
kill "$VIREO_PID"; wait "$VIREO_PID" 2>/dev/null || true; VIREO_PID=
echo "vireo: $(grep -c 'frontend connected' "$RUN/vireo.log") connection(s); warnings: $(grep -c WARN "$RUN/vireo.log" || true)"
awk -v a="$start" -v b="$end" 'BEGIN{printf "boot + test + poweroff: %.1f s\n", b-a}'
if grep -q 'GUEST-RESULT: PASS' "$RUN/guest.log" && [ -n "$P" ] && [ "$P" = "$H1" ] && [ "$P" = "$H2" ] && [ "$P" = "$H3" ]; then
  echo "DEMO: PASS — the guest's writes are on the host image, its reads returned them"
else
  echo "DEMO: FAIL"; tail -20 "$RUN/guest.log"; tail -20 "$RUN/vireo.log"; exit 1
fi
