#!/usr/bin/env bash
# Run stockstream on the embedded defaults: a local Kafka broker (127.0.0.1:9092), the Faust
# worker, and a simulated real-time quote feed. Ctrl-C stops the feed and the worker; the
# broker keeps running (scripts/kafka.sh stop).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/bootstrap.sh"
VENV="${STOCKSTREAM_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
export STOCKSTREAM_ENV="${STOCKSTREAM_ENV:-dev}"
export KAFKA_PORT="${KAFKA_PORT:-9092}"
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$KAFKA_PORT}"
WEB_PORT="${STOCKSTREAM_WEB_PORT:-6066}"
mkdir -p .local
LOG=.local/worker.log

"$ROOT/scripts/kafka.sh" start >/dev/null
stockstream topics

faust -A stockstream worker -l info >"$LOG" 2>&1 &
WORKER=$!
cleanup() {
  echo "stopping worker (pid $WORKER)"
  kill -TERM "$WORKER" 2>/dev/null || true
  wait "$WORKER" 2>/dev/null || true
  echo "broker still running: scripts/kafka.sh stop"
}
trap cleanup EXIT

for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$WEB_PORT/ready/" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$WORKER" 2>/dev/null; then echo "worker exited; see $LOG" >&2; tail -n 30 "$LOG" >&2; exit 1; fi
  sleep 0.5
done
cat <<MSG

stockstream is running.
  web view      http://127.0.0.1:$WEB_PORT/                    index: symbols, partitions, windows
  live chart    http://127.0.0.1:$WEB_PORT/chart/              one-minute candles, anomalies marked
                http://127.0.0.1:$WEB_PORT/windows/            open windows per partition
  metrics       http://127.0.0.1:$WEB_PORT/metrics/
  health        http://127.0.0.1:$WEB_PORT/health/  /ready/
  worker log    $LOG
  aggregates    $VENV/bin/stockstream tail aggregated     (in another terminal)
Feeding simulated quotes in real time; the first windows close a minute and ${AGG_GRACE_SECONDS:-5} s after start.
Ctrl-C to stop.

MSG
stockstream produce --source simulate
