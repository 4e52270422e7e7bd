#!/usr/bin/env bash
# Create (or update) the project virtualenv at .venv with stockstream and its dev tools.
# Sourced by quickstart.sh and test.sh; safe to run again (pip is a no-op when up to date).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STOCKSTREAM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python >= 3.11 required ($("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "bootstrap: '$tool' is required for the local Kafka broker" >&2; exit 1; }
done
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.stockstream-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
  touch "$stamp"
fi

# dbt (the analytics layer, dbt/) in its own virtualenv: dbt-core 1.11 pins pathspec<0.13, which
# the dev tools above outgrew. scripts/dbt.sh runs it. Re-installed when these pins change.
# s3fs: DuckDB reads the S3/MinIO archive through it (dbt/profiles.yml, target duckdb-s3).
DBT_VENV="${DBT_VENV:-$ROOT/.venv-dbt}"
DBT_REQUIREMENTS=("dbt-core~=1.11.0" "dbt-duckdb~=1.11.0" "dbt-bigquery~=1.11.0" "s3fs~=2026.9.0")
if [ ! -x "$DBT_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$DBT_VENV"
fi
dbt_stamp="$DBT_VENV/.stockstream-dbt-installed"
if [ ! -f "$dbt_stamp" ] || [ "$(cat "$dbt_stamp")" != "${DBT_REQUIREMENTS[*]}" ]; then
  "$DBT_VENV/bin/python" -m pip install --quiet --upgrade pip
  "$DBT_VENV/bin/python" -m pip install --quiet "${DBT_REQUIREMENTS[@]}"
  printf '%s' "${DBT_REQUIREMENTS[*]}" >"$dbt_stamp"
fi
