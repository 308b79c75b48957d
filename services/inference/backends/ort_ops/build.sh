#!/usr/bin/env bash
# Builds libmeshserve_ort_ops.so (meshserve_ops.cc) beside this script; `make install` and the CPU image run it.
#
#   bash services/inference/backends/ort_ops/build.sh        # idempotent: a no-op when the library is newer
#
# Needs a C++17 compiler and ONNX Runtime's C/C++ API headers. No PyPI wheel carries those headers; Debian's
# libonnxruntime-dev does (1.23 in sid, 1.21 in trixie). Its .deb is fetched with `apt-get download` from a
# private package list (the machine's apt sources are not touched), unpacked with dpkg-deb, and only its
# include/onnxruntime folder is kept, cached in $ORT_HEADERS (default ~/.cache/meshserve/onnxruntime-headers).
# The library uses the C API version of that header; newer runtimes serve older versions, so it loads into
# the onnxruntime wheel meshserve pins (tests/integration/test_ort_ops.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/libmeshserve_ort_ops.so"
headers="${ORT_HEADERS:-${XDG_CACHE_HOME:-$HOME/.cache}/meshserve/onnxruntime-headers}"
say() { echo "ort_ops/build.sh: $*" >&2; }

if [ -f "$out" ] && [ "$out" -nt "$here/meshserve_ops.cc" ] && [ "$out" -nt "$here/build.sh" ]; then
  exit 0
fi
command -v c++ >/dev/null 2>&1 || { say "no C++ compiler: install one (Debian: apt-get install g++)"; exit 1; }

if [ ! -f "$headers/onnxruntime_lite_custom_op.h" ]; then
  command -v apt-get >/dev/null 2>&1 || {
    say "no apt-get: put ONNX Runtime's include/onnxruntime headers (>= 1.21) in \$ORT_HEADERS"
    exit 1
  }
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  apt_opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root -qq)
  fetched=""
  for suite in sid trixie; do
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main" > "$work/sources.list"
    if apt-get "${apt_opts[@]}" update >/dev/null 2>&1 \
      && (cd "$work" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >/dev/null 2>&1); then
      fetched="$suite"
      break
    fi
  done
  [ -n "$fetched" ] || { say "could not download Debian's libonnxruntime-dev (sid or trixie)"; exit 1; }
  dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/deb"
  mkdir -p "$headers"
  cp -r "$work/deb/usr/include/onnxruntime/." "$headers/"
  say "ONNX Runtime headers from Debian $fetched's $(basename "$work"/libonnxruntime-dev_*.deb) in $headers"
fi

# No -march: the image stays portable, and these kernels are small next to the GEMMs ONNX Runtime runs.
c++ -O3 -fopenmp-simd -std=c++17 -fPIC -shared -fvisibility=hidden -Wall -Wextra -I"$headers" \
  "$here/meshserve_ops.cc" -o "$out.tmp"
mv "$out.tmp" "$out"
say "built $out"
