#!/usr/bin/env bash
# The README's two commands, and what they share.
#
#   scripts/dev.sh demo    set up, build, start a 3-node lab and show it working
#   scripts/dev.sh test    set up, build and run every test
#   scripts/dev.sh build   set up and build the release binary only
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

build() {
  "$repo/scripts/setup.sh"
  cargo build --release --locked
}

# Runs a command with its echo, as a walkthrough would.
show() {
  printf '\n$'; printf ' %q' "$@"; printf '\n'
  "$@"
}

demo() {
  local shoal="$repo/target/release/shoal"
  if [ -d /run/shoal-lab/lab ] || ip netns list | grep -q '^shoal-lab-'; then
    echo "Removing the previous demo lab first."
    "$shoal" lab down
  fi
  echo "A 3-node lab: node1 runs 'swarm init', node2 and node3 join with its worker token."
  show "$shoal" lab up --nodes 3
  show "$shoal" lab exec node1 -- shoal node ls
  echo
  echo "A service of 3 replicas, then 5: tasks spread over the nodes."
  show "$shoal" lab exec node1 -- shoal service create --name web --replicas 3 -- shoal whoami --listen 0.0.0.0:8080
  show "$shoal" lab exec node1 -- shoal service scale web=5
  show "$shoal" lab exec node1 -- shoal service ps web
  show "$shoal" lab exec node1 -- shoal service logs web
  echo
  echo "The eBPF ingress classifier on node2 counts what reaches it: ping, VXLAN, gossip."
  show "$shoal" lab exec client -- ping -c 3 -i 0.2 -q 192.168.77.12
  show "$shoal" lab exec client -- bash -c \
    'for i in 1 2 3 4 5; do echo hi >/dev/udp/192.168.77.12/4789; echo hi >/dev/udp/192.168.77.12/7946; done'
  show "$shoal" lab exec node2 -- shoal dataplane status
  show "$shoal" lab status
  cat <<MSG

The lab stays up for exploring, e.g.:
  $shoal lab exec node1 -- shoal service ps web
  $shoal lab exec node1 -- shoal node update --availability drain node2
Remove it with:
  $shoal lab down
MSG
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
    SHOAL_BIN="$repo/target/release/shoal" cargo test --release --locked
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test|build" >&2
    exit 2
    ;;
esac
