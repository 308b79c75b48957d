#!/usr/bin/env bash
# One sitting against the peers: two alternating rounds of llama-server (-np 32, its prompt cache on, as users
# run it), the mesh through Envoy (--num-slots=32, the result cache off) in each precision of MESH_PRECISIONS,
# and, where OPENVINO_PYTHON is set, OpenVINO GenAI's continuous-batching pipeline in process; the same prompts,
# client report and settings (greedy, 128 new tokens); then the 1,000-token-prompt row (8 streams).
#
#   LLAMA_SERVER=/tmp/lcp/build/bin/llama-server bench/peer_rounds.sh [OUT_DIR]
#   MESH_PRECISIONS="int8 w8a8"   each a mesh per round (default int8; prepare-model each one first)
#   OPENVINO_PYTHON=/tmp/ov-venv/bin/python OPENVINO_MODEL=/tmp/smol-ov-int8   (see bench/openvino_peer.py)
#   LONG_ROUNDS=0                 skips the 1,000-token-prompt row
#
# llama-server is built from the llama.cpp vendored in the llama-cpp-python sdist (see
# bench/llamacpp_peer.py). Each measurement is one JSON report in OUT_DIR (default bench-results/), named
# ROUND-{peer,mesh-PRECISION,openvino}-{c1,c32,long-c8}.json; the peak RSS of the servers is printed.
# Run it on a quiet machine: the servers, the mesh and the client share its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_SERVER=${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}
OUT=${1:-bench-results}
GGUF=models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf
LONG=bench/data/long_prompts.txt
PEER_PORT=${PEER_PORT:-8081}
MESH_PORT=${MESH_PORT:-31000}
MESH_PRECISIONS=${MESH_PRECISIONS:-int8}
OPENVINO_PYTHON=${OPENVINO_PYTHON:-}
OPENVINO_MODEL=${OPENVINO_MODEL:-/tmp/smol-ov-int8}
LONG_ROUNDS=${LONG_ROUNDS:-2}
RUN_DIR=$(mktemp -d)
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN_DIR"' EXIT

start_peer() {
  "$LLAMA_SERVER" -m "$GGUF" -t 2 -np 32 -c 65536 --host 127.0.0.1 --port "$PEER_PORT" > "$OUT/llama-server.log" 2>&1 &
  PEER=$!
  for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PEER_PORT/health" > /dev/null && return; sleep 1; done
  echo "llama-server did not start: see $OUT/llama-server.log" >&2; exit 1
}
stop_peer() { echo "$1 llama-server $(grep VmHWM /proc/$PEER/status | tr -s ' ')"; kill $PEER; wait $PEER || true; }
peer() { .venv/bin/python bench/llamacpp_peer.py --server "http://127.0.0.1:$PEER_PORT" --prompt-cache --max-tokens 128 --json "$@"; }
openvino() { PYTHONPATH=$PWD "$OPENVINO_PYTHON" bench/openvino_peer.py "$OPENVINO_MODEL" --max-tokens 128 --json "$@"; }
MESH_LOG="$OUT/mesh.log"
SERVED=(--inference-arg=--num-slots=32 --router-arg=--result-cache-mb=0)
# shellcheck source=bench/mesh.sh
. bench/mesh.sh

for round in 1 2; do
  start_peer
  peer --concurrency 1 --requests 16 --warmup 2 > "$OUT/r$round-peer-c1.json"
  peer --concurrency 32 --requests 96 --warmup 8 > "$OUT/r$round-peer-c32.json"
  stop_peer "round $round"
  for precision in $MESH_PRECISIONS; do
    start_mesh --precision "$precision" "${SERVED[@]}"
    mesh --concurrency 1 --requests 16 --warmup 2 > "$OUT/r$round-mesh-$precision-c1.json"
    mesh --concurrency 32 --requests 96 --warmup 8 > "$OUT/r$round-mesh-$precision-c32.json"
    stop_mesh "round $round ($precision)"
  done
  if [ -n "$OPENVINO_PYTHON" ]; then
    openvino --concurrency 1 --requests 16 > "$OUT/r$round-openvino-c1.json"
    openvino --concurrency 32 --requests 96 > "$OUT/r$round-openvino-c32.json"
  fi
done
for round in $(seq "$LONG_ROUNDS"); do
  start_peer
  peer --prompts "$LONG" --concurrency 8 --requests 16 --warmup 2 > "$OUT/r$round-peer-long-c8.json"
  stop_peer "long round $round"
  for precision in $MESH_PRECISIONS; do
    start_mesh --precision "$precision" "${SERVED[@]}"
    mesh --prompts "$LONG" --concurrency 8 --requests 16 --warmup 2 > "$OUT/r$round-mesh-$precision-long-c8.json"
    stop_mesh "long round $round ($precision)"
  done
done
.venv/bin/python - "$OUT" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("r*-*.json")):
    d = json.loads(path.read_text())
    t, i = d["ttft_ms"], d["itl_ms"]
    print(f"{path.stem:24s} {d['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 {t['p50']:6.0f}/{t['p99']:6.0f} ms"
          f"  ITL p50/p99 {i['p50']:5.1f}/{i['p99']:5.1f} ms  errors {d['errors']}")
PY
