#!/usr/bin/env bash
# The README's two commands, and what they share.
#
#   scripts/dev.sh demo    set up, build, and play the Swarm walkthrough on a 3-node lab
#   scripts/dev.sh test    set up, build and run every test
#   scripts/dev.sh build   set up and build the release binary only
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

build() {
  "$repo/scripts/setup.sh"
  cargo build --release --locked
}

# The binary `cargo build --release` made (CARGO_TARGET_DIR is honoured).
shoal="${CARGO_TARGET_DIR:-$repo/target}/release/shoal"

# The Swarm walkthrough, narrated and checked step by step (`shoal lab demo`); it replaces a
# previous demo lab and leaves this one up.
demo() {
  "$shoal" lab demo
}

case "${1:-}" in
  build)
    build
    ;;
  demo)
    build
    demo
    ;;
  test)
    build
    cargo fmt --all -- --check
    cargo clippy --release --locked --all-targets -- -D warnings
    # The kernel programs, linted for their own target with nightly.
    cargo +nightly clippy --release --locked -p shoal-ebpf --target bpfel-unknown-none \
      -Z build-std=core -- -D warnings
    SHOAL_BIN="$shoal" cargo test --release --locked
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test|build" >&2
    exit 2
    ;;
esac
