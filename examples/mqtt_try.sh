#!/usr/bin/env bash
# Tries kole over MQTT with zero setup: the example controller with its embedded broker and three
# kole-agent processes (--runtime record: workloads are only recorded), as separate processes;
# passes when the controller reports the workload ready on all three nodes.
#
#   examples/mqtt_try.sh            # builds the examples (debug) first
#   KOLE_TRY_TIMEOUT=60 examples/mqtt_try.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kole-mqtt-try.XXXXXX")"
TIMEOUT="${KOLE_TRY_TIMEOUT:-60}"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

cd "$ROOT"
cargo build -q -p kole-examples --examples --bins
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/debug/examples"

"$BIN/mqtt_controller" --embedded-broker --snapshots "$WORK/snapshots" > "$WORK/controller.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    grep -q "embedded broker listening on" "$WORK/controller.log" && break
    sleep 0.1
done
BROKER="$(sed -n 's/^embedded broker listening on //p' "$WORK/controller.log")"
[ -n "$BROKER" ] || { echo "the controller did not start:"; cat "$WORK/controller.log"; exit 1; }
echo "controller up, broker $BROKER"

for i in 1 2 3; do
    "$TARGET/debug/kole-agent" --name "edge-$i" --labels "tier=edge,site=lab-$i" --broker "$BROKER" \
        --runtime record --state-dir "$WORK/edge-$i" > "$WORK/agent-$i.log" 2>&1 &
    pids+=($!)
done

for _ in $(seq 1 $((TIMEOUT * 10))); do
    if grep -q "targeted 3 updated 3 ready 3 failed 0 .* Complete" "$WORK/controller.log"; then
        grep "^status" "$WORK/controller.log" | tail -1
        echo "OK: 3 agents registered and converged (logs in $WORK)"
        exit 0
    fi
    sleep 0.1
done
echo "FAILED: not converged within ${TIMEOUT}s; controller log:"
cat "$WORK/controller.log"
exit 1
