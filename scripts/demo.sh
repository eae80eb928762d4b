#!/usr/bin/env bash
# Vireo's main job, shown on this machine. Until the block device lands this is the invalidation
# protocol under a remap storm: worker threads use cached pointers into guest memory while the
# memory map changes under them 100,000 times, retired memory PROT_NONE, every access verified.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "demo: cargo is needed (https://rustup.rs)" >&2
  exit 1
fi
cargo build --release -p vireo
./target/release/vireo memory-demo "$@"
