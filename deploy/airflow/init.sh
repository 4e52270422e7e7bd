#!/usr/bin/env bash
# Prepare an Airflow deployment of stockstream (run once per deployment and after each release;
# idempotent): migrate the metadata database, register the DAGs and their per-DAG permissions,
# then create the roles of roles.json (roles.md explains them).
#
# Environment: AIRFLOW_CONFIG (default: this folder's airflow.cfg), the metadata database in
# AIRFLOW__DATABASE__SQL_ALCHEMY_CONN(_SECRET|_CMD), AIRFLOW_BIN (default: the airflow of
# AIRFLOW_VENV, itself by default the project's .venv-airflow made by scripts/airflow_env.sh).
#
# `airflow roles import` creates missing roles and never changes an existing one: to apply an
# edited roles.json to a running deployment, `airflow roles delete stockstream_operator` (users
# keep their accounts; re-assign them with `airflow users add-role`) and run this again.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
AIRFLOW="${AIRFLOW_BIN:-${AIRFLOW_VENV:-$ROOT/.venv-airflow}/bin/airflow}"
export AIRFLOW_CONFIG="${AIRFLOW_CONFIG:-$HERE/airflow.cfg}"

"$AIRFLOW" db migrate
# The per-DAG resources (DAG:stockstream_backfill...) that roles.json grants exist only once
# the DAGs are serialized and their permissions synced.
"$AIRFLOW" dags reserialize
"$AIRFLOW" sync-perm --include-dags
"$AIRFLOW" roles import "$HERE/roles.json"
