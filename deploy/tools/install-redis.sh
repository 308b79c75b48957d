#!/usr/bin/env bash
# Installs Debian's redis-server (the result cache's shared tier, tests/e2e/test_result_cache.py) when it
# is missing. Idempotent; asks no registry when redis-server is already on PATH. It never starts a
# daemon: the tests start their own redis-server on a free port.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  exit 0
fi
echo "deploy/tools/install-redis.sh: installing Debian's redis-server" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q redis-server >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -q redis-server >/dev/null; }
# Debian's package may start its own service where an init system runs; the tests do not use it
if command -v service >/dev/null; then service redis-server stop >/dev/null 2>&1 || true; fi
command -v redis-server >/dev/null
