#!/usr/bin/env bash
# Create (or update) the Airflow virtualenv at .venv-airflow (AIRFLOW_VENV overrides).
# Airflow has its own environment because its dependency tree (SQLAlchemy, FastAPI, pendulum,
# hundreds of pins) would fight the worker's; the DAGs never import stockstream, they run the
# `stockstream` command of the project venv and scripts/dbt.sh, so nothing else goes in here.
# Idempotent: a stamp file records what was installed; a second run is a no-op.
#
# Pins: Airflow's constraints file lives on GitHub, which this setup cannot assume to be
# reachable, so the versions that matter are pinned here instead: apache-airflow, the standard
# provider (the TaskFlow @task decorator lives there in Airflow 3) and the FAB provider (the auth
# manager with custom roles, deploy/airflow/); the rest is resolved by uv within Airflow's ranges.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AIRFLOW_VENV:-$ROOT/.venv-airflow}"
PYTHON="${PYTHON:-python3}"
AIRFLOW_VERSION="3.3.2"
REQUIREMENTS=(
  "apache-airflow==$AIRFLOW_VERSION"
  "apache-airflow-providers-standard==1.21.0"
  "apache-airflow-providers-fab==3.10.2"
)
stamp="$VENV/.airflow-installed"
want="$AIRFLOW_VERSION ${REQUIREMENTS[*]}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/airflow" ]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] < (3, 15)))'; then
  echo "airflow_env: Airflow $AIRFLOW_VERSION needs Python 3.10-3.14 ($("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# uv resolves and installs Airflow's ~200 packages in a fraction of pip's time.
if [ ! -x "$VENV/bin/uv" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.5"
fi
"$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" "${REQUIREMENTS[@]}"
"$VENV/bin/airflow" version >/dev/null
printf '%s' "$want" >"$stamp"
echo "airflow_env: Airflow $AIRFLOW_VERSION ready in $VENV"
