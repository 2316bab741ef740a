#!/usr/bin/env bash
# Installs shoal on this host as a systemd service. The one provisioning script: operators run
# it on real hosts (docs/operations.md) and the Vagrantfile runs it in each VM.
#
#   packaging/install.sh [--advertise-addr IP] [--no-start]
#
# SHOAL_BIN=path installs a prebuilt binary instead of building one (the build needs
# scripts/setup.sh's toolchain). DESTDIR=dir stages the files under dir and starts nothing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
advertise=""
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --advertise-addr) advertise=${2:?--advertise-addr needs an IP}; shift 2 ;;
    --no-start) start=0; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
dest=${DESTDIR:-}

if [ -z "${SHOAL_BIN:-}" ]; then
  "$repo/scripts/setup.sh"
  (cd "$repo" && cargo build --release --locked -p shoal-control)
  SHOAL_BIN="$repo/target/release/shoal"
fi
[ -x "$SHOAL_BIN" ] || { echo "install.sh: $SHOAL_BIN is not an executable" >&2; exit 1; }

install -D -m 0755 "$SHOAL_BIN" "$dest/usr/local/bin/shoal"
install -D -m 0644 "$repo/packaging/shoal.service" "$dest/etc/systemd/system/shoal.service"
config="$dest/etc/shoal/agent.toml"
if [ ! -e "$config" ]; then
  install -D -m 0644 "$repo/packaging/agent.toml" "$config"
fi
if [ -n "$advertise" ]; then
  # One advertise address, set (or replaced) uncommented.
  sed -i '/^advertise_addr *=/d' "$config"
  printf 'advertise_addr = "%s"\n' "$advertise" >> "$config"
fi
echo "installed shoal to ${dest}/usr/local/bin, unit shoal.service, config $config"

if [ -z "$dest" ] && [ "$start" = 1 ]; then
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
  systemctl daemon-reload
  systemctl enable shoal.service
  # An upgrade restarts the agent on the new binary: tasks, flows and DNS carry on (live
  # restore, docs/operations.md "Upgrades and restarts").
  systemctl restart shoal.service
  systemctl --no-pager --lines=0 status shoal.service
fi
