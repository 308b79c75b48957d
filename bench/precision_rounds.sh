#!/usr/bin/env bash
# One sitting of the mesh through Envoy in two precisions (default: int8, the default, against w8a8), two
# alternating rounds, the result cache off (the built-in prompts repeat, and a cached replay is not
# generation): 1 stream and 32 streams, greedy, 128 new tokens, the client report of `meshserve bench`.
#
#   bench/precision_rounds.sh [OUT_DIR] [PRECISION ...]
#
# Each measurement is one JSON report in OUT_DIR (default bench-results/), ROUND-PRECISION-{c1,c32}.json;
# the inference process's peak RSS is printed (start_mesh and stop_mesh: bench/mesh.sh). Run it on a quiet
# machine: the mesh and the client share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
shift || true
PRECISIONS=(int8 w8a8)
[ $# -eq 0 ] || PRECISIONS=("$@")
MESH_PORT=${MESH_PORT:-31000}
RUN_DIR=$(mktemp -d)
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN_DIR"' EXIT

# shellcheck source=bench/mesh.sh
. bench/mesh.sh

for round in 1 2; do
  for precision in "${PRECISIONS[@]}"; do
    MESH_LOG="$OUT/mesh-$precision.log"
    start_mesh --precision "$precision" --inference-arg=--num-slots=32 --router-arg=--result-cache-mb=0
    mesh --concurrency 1 --requests 16 --warmup 2 > "$OUT/r$round-$precision-c1.json"
    mesh --concurrency 32 --requests 96 --warmup 8 > "$OUT/r$round-$precision-c32.json"
    stop_mesh "round $round $precision"
  done
done
