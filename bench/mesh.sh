# Sourced by the bench/*_rounds.sh scripts: start and stop one mesh on ports from MESH_PORT, its run files in
# RUN_DIR, its log in MESH_LOG; `start_mesh ARGS...` passes ARGS to `meshserve up`.
start_mesh() {
  .venv/bin/meshserve up --port "$MESH_PORT" --admin-port $((MESH_PORT + 1)) --router-port $((MESH_PORT + 10)) --router-admin-port $((MESH_PORT + 50)) \
    --tokenizer-port $((MESH_PORT + 20)) --inference-port $((MESH_PORT + 30)) --openai-port $((MESH_PORT + 40)) \
    --metrics-port-base $((MESH_PORT + 100)) --run-dir "$RUN_DIR" "$@" > "$MESH_LOG" 2>&1 &
  MESH=$!
  for _ in $(seq 180); do grep -q "is serving on" "$MESH_LOG" && return; sleep 1; done
  echo "the mesh did not start: see $MESH_LOG" >&2; exit 1
}
stop_mesh() {
  echo "$1 mesh inference $(grep VmHWM /proc/"$(pgrep -f "serve-inference --port $((MESH_PORT + 30))")"/status | tr -s ' ')"
  kill -INT $MESH; wait $MESH || true
}
mesh() { .venv/bin/meshserve bench --target "127.0.0.1:$MESH_PORT" --max-tokens 128 --json "$@"; }
