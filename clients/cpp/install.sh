#!/usr/bin/env bash
# Installs what the C++ client (clients/cpp) is built with, from Debian: protoc with the gRPC C++ plugin
# (protobuf-compiler-grpc) and the gRPC C++ library (libgrpc++-dev, which pulls libprotobuf-dev).
# Idempotent: when protoc, grpc_cpp_plugin and grpc++'s pkg-config file are there, no package manager runs.
#
#   bash clients/cpp/install.sh
set -euo pipefail

packages=(protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev pkg-config)

say() { echo "clients/cpp/install.sh: $*" >&2; }

have_all() {
  command -v protoc >/dev/null && command -v grpc_cpp_plugin >/dev/null && command -v c++ >/dev/null \
    && pkg-config --exists grpc++ protobuf 2>/dev/null
}

if have_all; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  say "protoc, grpc_cpp_plugin or grpc++ missing and no apt-get here: install ${packages[*]} (or their equivalents)"
  exit 1
fi
run_as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { say "installing ${packages[*]} needs root (or sudo)"; exit 1; }
  run_as_root=(sudo)
fi
command -v c++ >/dev/null || packages+=(g++ make)
say "apt-get install ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! "${run_as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; then
  # an empty or stale package list on a fresh machine
  say "apt-get update"
  "${run_as_root[@]}" apt-get update -qq >/dev/null
  "${run_as_root[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
have_all || { say "installed ${packages[*]}, but protoc, grpc_cpp_plugin or grpc++ is still missing"; exit 1; }
say "installed $(protoc --version) and grpc++ $(pkg-config --modversion grpc++)"
