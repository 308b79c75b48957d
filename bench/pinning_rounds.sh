#!/usr/bin/env bash
# CPU pinning through Envoy, one sitting: the machine's cores given to inference three ways, each at 1 and at
# 32 streams (greedy, 128 new tokens, result cache off: the built-in prompts repeat, and a cached replay is not
# generation; 32 slots per replica, so 32 streams queue nowhere):
#   one       1 replica, unpinned, ONNX Runtime's own thread count (meshserve up's default)
#   pinned    2 replicas, --inference-cpus auto (one core set each: on 2 cores, one core each), threads per set
#             (meshserve up's default for several replicas since this measurement)
#   unpinned  2 replicas, --inference-cpus none: sharing the cores, --threads = cores / 2 each
#
#   bench/pinning_rounds.sh [OUT_DIR] [ROUNDS]
#
# Each measurement is one JSON report of `meshserve bench` in OUT_DIR (default bench-results/),
# rROUND-CONFIG-{c1,c32}.json; a table of them is printed at the end. Run it on a quiet machine: the mesh and
# the client share its cores, and every other process takes from them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
ROUNDS=${2:-1}
MESH_PORT=${MESH_PORT:-32000}
RUN_DIR=$(mktemp -d)
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN_DIR"' EXIT

# shellcheck source=bench/mesh.sh
. bench/mesh.sh

declare -A CONFIGS=(
  [one]="--inference-replicas 1"
  [pinned]="--inference-replicas 2 --inference-cpus auto"
  [unpinned]="--inference-replicas 2 --inference-cpus none"
)
echo "machine: $(nproc) cores, $(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l) NUMA node(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$ROUNDS"); do
  for config in one pinned unpinned; do
    MESH_LOG="$OUT/mesh-pinning-$config.log"
    # shellcheck disable=SC2086  # the config is several words
    start_mesh ${CONFIGS[$config]} --inference-arg=--num-slots=32 --router-arg=--result-cache-mb=0
    mesh --concurrency 1 --requests 8 --warmup 2 > "$OUT/r$round-$config-c1.json"
    mesh --concurrency 32 --requests 64 --warmup 8 > "$OUT/r$round-$config-c32.json"
    stop_mesh "round $round $config"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/python - "$OUT" "$ROUNDS" <<'PY'
import json, sys
from pathlib import Path
out, rounds = Path(sys.argv[1]), int(sys.argv[2])
print(f"{'config':10} {'streams':>7} {'tokens/s':>9} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'ITL p50 ms':>11} {'errors':>6}")
for config in ("one", "pinned", "unpinned"):
    for streams in ("c1", "c32"):
        for r in range(1, rounds + 1):
            report = json.loads((out / f"r{r}-{config}-{streams}.json").read_text())
            print(f"{config:10} {streams[1:]:>7} {report['tokens_per_s']:>9.1f} {report['ttft_ms']['p50']:>12.0f} "
                  f"{report['ttft_ms']['p90']:>12.0f} {report['itl_ms']['p50']:>11.1f} {report['errors']:>6}")
PY
