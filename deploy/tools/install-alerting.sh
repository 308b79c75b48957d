#!/usr/bin/env bash
# Installs Debian's Prometheus and Alertmanager (packages prometheus and prometheus-alertmanager: binaries
# prometheus, prometheus-alertmanager and amtool) when they are missing, for tests/deploy/test_alertmanager.py,
# which runs both against a mesh of its own. Idempotent; asks no registry when both binaries are on PATH. It never keeps a daemon running:
# the packages may start their own services where an init system runs, and those are stopped again (the
# test starts its own on free ports).
set -euo pipefail
say() { echo "deploy/tools/install-alerting.sh: $*" >&2; }
if command -v prometheus >/dev/null && command -v prometheus-alertmanager >/dev/null && command -v amtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  say "installing prometheus and prometheus-alertmanager needs root (apt-get)"
  exit 1
fi
say "installing Debian's prometheus and prometheus-alertmanager"
export DEBIAN_FRONTEND=noninteractive
packages=(prometheus prometheus-alertmanager)
apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
}
if command -v service >/dev/null; then
  service prometheus stop >/dev/null 2>&1 || true
  service prometheus-alertmanager stop >/dev/null 2>&1 || true
fi
for binary in prometheus prometheus-alertmanager amtool; do
  command -v "$binary" >/dev/null || { say "$binary is still missing after apt-get install"; exit 1; }
done
