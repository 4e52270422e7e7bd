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

# Airflow's own virtualenv (a no-op once made): the DAGs are type-checked against the real
# Airflow and tests/integration/test_airflow_dags.py runs them in it.
"$ROOT/scripts/airflow_env.sh"

echo "== ruff"; ruff check stockstream tests benchmarks dags deploy scripts; ruff format --check stockstream tests benchmarks dags deploy scripts
echo "== mypy"; mypy; mypy scripts deploy; mypy --python-executable "${AIRFLOW_VENV:-$ROOT/.venv-airflow}/bin/python" dags
echo "== pytest (with coverage of stockstream, worker processes included)"
python -m pytest --cov --cov-report=term "$@"
