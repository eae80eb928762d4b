#!/usr/bin/env bash
# The test command: what CI runs (.ci/run calls this). Formatting, lints, every test of the
# workspace, and the loom models of the invalidation protocol.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (-D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== DPDK (Debian's dpdk-dev: testpmd and libdpdk, the frontend of the net interop tests)"
if ! command -v dpdk-testpmd >/dev/null || ! pkg-config --exists libdpdk 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpdk-dev pkg-config gcc >/dev/null
fi

echo "== tests (profile ci: optimized, with overflow checks and debug assertions)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --cargo-profile ci --no-fail-fast
else
  cargo test --workspace --profile ci --no-fail-fast
fi
cargo test --workspace --doc

echo "== loom models of the invalidation protocol"
# The preemption bound is 3: every model finishes in seconds with it, and each mutation of the
# protocol we tried (no read_retry, no retiring check, no pin wait, a Relaxed store where loom
# asked for Release) fails at that bound. Separate target dir: the cfg changes every crate's build.
start=$(date +%s)
RUSTFLAGS="--cfg vireo_loom" LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}" CARGO_TARGET_DIR=target/loom \
  cargo test --release -p vireo-memory --test loom_protocol
echo "loom: $(( $(date +%s) - start )) s"

echo "== end to end: a Linux guest in QEMU on vireo blk (installs QEMU and the guest kernel if missing)"
./scripts/demo.sh

echo "== end to end: read-only disk, memory hotplug under I/O, live migration (tests/e2e/run.py)"
python3 tests/e2e/run.py
