#!/usr/bin/env bash
# Idempotent machine set-up for building and testing shoal (Debian 12, root).
# Called by both README commands; a second run only checks and returns.
set -euo pipefail

BPF_TOOLS=${BPF_TOOLS:-/opt/bpf-tools}
BPF_LINKER_VERSION=0.13.0
# Debian packages the build, the lab and the tests use (strace: the netlink test counts what
# the agent spawns).
PACKAGES=(iproute2 iputils-ping procps psmisc util-linux curl ca-certificates bpftool systemd nftables python3
  bind9-dnsutils strace)
# The docker CLI, for the Engine API test (tests/tests/docker_cli.rs). Debian ships the client
# only with the daemon (docker.io): it is installed with no service started and masked below,
# so dockerd never runs (a docker.socket left enabled would start it on the first `docker`).
command -v docker >/dev/null || PACKAGES+=(docker.io)

# Load generators and servers the benchmarks compare with (`setup.sh bench`).
# dnsmasq-base is the binary without the system service; unbound's service is kept from
# starting (below): the benchmark starts its own servers, in its own namespaces. haproxy is the
# routing-mesh bench's user-space proxy baseline (its service is kept from starting too).
BENCH_PACKAGES=(wrk iperf3 nginx-light dnsperf unbound dnsmasq-base haproxy)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (shoal manages namespaces, links and eBPF programs)"

# A /dev/null that is a regular file (some root tool replaced it) breaks the build in a way
# that is hard to read: cargo feeds it to `rustc -` as source, and it holds old compiler
# warnings. Put the device back first.
if [ ! -c /dev/null ]; then
  printf 'setup: /dev/null is not the null device; recreating it\n' >&2
  rm -f /dev/null && mknod -m 666 /dev/null c 1 3 || die "could not recreate /dev/null"
fi
command -v rustup >/dev/null || die "rustup not found: install Rust with rustup (stable 1.95 and nightly)"

# 1. Debian packages, installed only when one is missing.
wanted=("${PACKAGES[@]}")
[ "${1:-}" = bench ] && wanted+=("${BENCH_PACKAGES[@]}")
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # A resolver service started by the install would take the host's port 53: no service starts
  # during the install (policy-rc.d 101, honoured by invoke-rc.d and deb-systemd-invoke).
  policy=/usr/sbin/policy-rc.d
  own_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { $own_policy && rm -f "$policy"; die "apt-get install failed"; }
  $own_policy && rm -f "$policy"
  # Nor at the next boot.
  for service in unbound haproxy; do
    if [[ " ${missing[*]} " == *" $service "* ]] && command -v systemctl >/dev/null; then
      systemctl disable --quiet "$service" 2>/dev/null || true
    fi
  done
  if [[ " ${missing[*]} " == *" docker.io "* ]] && command -v systemctl >/dev/null; then
    systemctl mask --quiet docker.service docker.socket containerd.service 2>/dev/null || true
  fi
fi

# 2. Toolchains: stable for user space (pinned by rust-toolchain.toml), nightly + rust-src for eBPF.
rustup toolchain list | grep -q '^nightly' || die "no nightly toolchain: 'rustup toolchain install nightly' (the eBPF crate needs it)"
SYSROOT=$(rustc +nightly --print sysroot)
if [ ! -d "$SYSROOT/lib/rustlib/src/rust/library" ]; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly || die "could not add rust-src to nightly (offline? see docs/operations.md)"
fi

# 3. bpf-linker built against nightly's own LLVM (no system LLVM needed).
SO=$(cd "$SYSROOT/lib" && ls libLLVM.so.*-rust-* 2>/dev/null | head -n1) || true
[ -n "$SO" ] || die "nightly has no libLLVM.so in $SYSROOT/lib; cannot build bpf-linker"
LLVM_MAJOR=$(echo "$SO" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
mkdir -p "$BPF_TOOLS/llvm/lib"
ln -sfn "$SYSROOT/lib/$SO" "$BPF_TOOLS/llvm/lib/libLLVM.so"
ln -sfn "$SYSROOT/lib/$SO" "$BPF_TOOLS/llvm/lib/$SO"
stamp="$BPF_TOOLS/.bpf-linker-$BPF_LINKER_VERSION-$SO"
if [ ! -x "$BPF_TOOLS/bin/bpf-linker" ] || [ ! -e "$stamp" ] || ! "$BPF_TOOLS/bin/bpf-linker" --version >/dev/null 2>&1; then
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about a minute)"
  LLVM_PREFIX="$BPF_TOOLS/llvm" cargo +stable install bpf-linker --version "$BPF_LINKER_VERSION" --locked \
    --no-default-features --features "llvm-$LLVM_MAJOR" --root "$BPF_TOOLS" --force -q
  rm -f "$BPF_TOOLS"/.bpf-linker-*
  touch "$stamp"
fi
# cargo (and aya-build inside build.rs) look for bpf-linker on PATH.
ln -sfn "$BPF_TOOLS/bin/bpf-linker" /usr/local/bin/bpf-linker

# 4. Kernel: bpffs, cgroup v2, BTF.
[ -e /sys/kernel/btf/vmlinux ] || die "kernel has no BTF (/sys/kernel/btf/vmlinux); shoal's eBPF programs need it"
if ! mount -t bpf | grep -q ' /sys/fs/bpf '; then
  say "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs (kernel without CONFIG_BPF_SYSCALL?)"
fi
mount -t cgroup2 | grep -q . || die "no cgroup v2 hierarchy mounted; shoal needs one for tasks and socket programs"
say "ok"
