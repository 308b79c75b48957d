#!/usr/bin/env bash
# One sitting of the mesh through Envoy in two precisions (default: int8, the default, against w8a8), two
# alternating rounds, the result cache off (the built-in prompts repeat, and a cached replay is not
# generation): 1 stream and 32 streams, greedy, 128 new tokens, the client report of `meshserve bench`.
#
#   bench/precision_rounds.sh [OUT_DIR] [PRECISION ...]
#
# Each measurement is one JSON report in OUT_DIR (default bench-results/), ROUND-PRECISION-{c1,c32}.json;
# the inference process's peak RSS is printed. Run it on a quiet machine: mesh and client share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
shift || true
PRECISIONS=("${@:-int8}")
[ $# -gt 0 ] || PRECISIONS=(int8 w8a8)
MESH_PORT=${MESH_PORT:-31000}
RUN_DIR=$(mktemp -d)
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN_DIR"' EXIT

start_mesh() {
  .venv/bin/meshserve up --precision "$1" --port "$MESH_PORT" --admin-port $((MESH_PORT + 1)) \
    --router-port $((MESH_PORT + 10)) --tokenizer-port $((MESH_PORT + 20)) --inference-port $((MESH_PORT + 30)) \
    --openai-port $((MESH_PORT + 40)) --metrics-port-base $((MESH_PORT + 100)) --run-dir "$RUN_DIR" \
    --inference-arg=--num-slots=32 --router-arg=--result-cache-mb=0 > "$OUT/mesh-$1.log" 2>&1 &
  MESH=$!
  for _ in $(seq 180); do grep -q "is serving on" "$OUT/mesh-$1.log" && return; sleep 1; done
  echo "the mesh did not start: see $OUT/mesh-$1.log" >&2; exit 1
}
stop_mesh() {
  echo "$1 inference $(grep VmHWM /proc/"$(pgrep -f "serve-inference --port $((MESH_PORT + 30))")"/status | tr -s ' ')"
  kill -INT $MESH; wait $MESH || true
}
mesh() { .venv/bin/meshserve bench --target "127.0.0.1:$MESH_PORT" --max-tokens 128 --json "$@"; }

for round in 1 2; do
  for precision in "${PRECISIONS[@]}"; do
    start_mesh "$precision"
    mesh --concurrency 1 --requests 16 --warmup 2 > "$OUT/r$round-$precision-c1.json"
    mesh --concurrency 32 --requests 96 --warmup 8 > "$OUT/r$round-$precision-c32.json"
    stop_mesh "round $round $precision"
  done
done
