#!/usr/bin/env bash
# The whole test suite: lint, types, unit tests, then integration tests against real services
# (a Kafka broker started by scripts/kafka.sh on port 19092, stopped afterwards).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not integration"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/bootstrap.sh"
VENV="${STOCKSTREAM_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"

echo "== ruff"; ruff check stockstream tests benchmarks; ruff format --check stockstream tests benchmarks
echo "== mypy"; mypy
echo "== pytest (with coverage of stockstream, worker processes included)"
python -m pytest --cov --cov-report=term "$@"
