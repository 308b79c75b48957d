#!/usr/bin/env bash
# A Docker engine and the base image for the container test (tests/deploy/test_containers.py), on a Debian
# machine where we are root. Idempotent: once everything is there it takes about a second.
#
#   bash deploy/tools/docker.sh engine   # install docker.io, docker-compose, debootstrap; start dockerd
#   bash deploy/tools/docker.sh base     # engine, then the base image meshserve-base:bookworm (once per machine)
#
# engine: Debian's docker.io (dockerd 20.10), docker-compose (1.29) and debootstrap, installed with apt-get when
#         missing. When no daemon answers, dockerd is started in the background (log: /var/log/meshserve-dockerd.log),
#         with the overlay2 storage driver where the kernel allows it and vfs otherwise (overlay2 builds the CPU image
#         several times faster: deploy/README.md has the numbers).
# base:   public images cannot be pulled on every machine, so the images start from Debian bookworm made here with
#         `debootstrap --variant=minbase` (python3, python3-venv, ca-certificates) and `docker import`. The host's CA
#         bundle goes in too, so pip and apt inside a build trust what the host trusts (a TLS-inspecting proxy's CA).
#         The image carries a label with the hash of this recipe and of that bundle; it is rebuilt when either changes.
set -euo pipefail

say() { echo "deploy/tools/docker.sh: $*" >&2; }

BASE_IMAGE="${MESHSERVE_BASE_IMAGE:-meshserve-base:bookworm}"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
MIRROR="${DEBOOTSTRAP_MIRROR:-http://deb.debian.org/debian}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
DOCKERD_LOG=/var/log/meshserve-dockerd.log

ensure_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ]; then
    say "missing ${missing[*]}, and installing them needs root (or set MESHSERVE_SKIP_CONTAINERS=1 to skip the container test)"
    exit 1
  fi
  say "apt-get install ${missing[*]}"
  # policy-rc.d: no init system here to start the daemon; we start it ourselves below
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  }
}

daemon_answers() { docker info >/dev/null 2>&1; }

start_dockerd() {
  local driver="$1"
  say "starting dockerd --storage-driver=$driver (log: $DOCKERD_LOG)"
  # setsid: the daemon outlives this script and the test run that started it
  setsid dockerd --storage-driver="$driver" >>"$DOCKERD_LOG" 2>&1 < /dev/null &
  local pid=$!
  for _ in $(seq 1 60); do
    daemon_answers && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  return 1
}

ensure_engine() {
  ensure_packages
  daemon_answers && return
  if [ "$(id -u)" != 0 ]; then
    say "no Docker daemon answers, and starting one needs root"
    exit 1
  fi
  if [ -e /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid  # left by a daemon that was killed with its machine session
  fi
  if grep -qw overlay /proc/filesystems && start_dockerd overlay2; then
    return
  fi
  start_dockerd vfs || { say "dockerd did not start; see $DOCKERD_LOG"; tail -n 20 "$DOCKERD_LOG" >&2; exit 1; }
}

recipe_hash() {
  { declare -f build_base; echo "$SUITE $PACKAGES"; sha256sum "$HOST_CA"; } | sha256sum | cut -c1-16
}

build_base() {
  local rootfs
  rootfs="$(mktemp -d /var/tmp/meshserve-rootfs.XXXXXX)"
  say "debootstrap $SUITE into $rootfs (a minute or two)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >/dev/null
  # what an image needs no copy of: downloaded packages, package lists (images run apt-get update), docs
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  install -m 0644 "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    --change "LABEL org.meshserve.base-recipe=$(recipe_hash)" \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

ensure_base() {
  ensure_engine
  local want have
  want="$(recipe_hash)"
  have="$(docker image inspect -f '{{ index .Config.Labels "org.meshserve.base-recipe" }}' "$BASE_IMAGE" 2>/dev/null || true)"
  if [ "$have" != "$want" ]; then
    build_base
    say "built $BASE_IMAGE ($(docker image inspect -f '{{ .Size }}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
  fi
}

case "${1:-base}" in
  engine) ensure_engine ;;
  base) ensure_base ;;
  *) say "usage: docker.sh [engine|base]"; exit 2 ;;
esac
