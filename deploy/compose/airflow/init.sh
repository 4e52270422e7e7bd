#!/usr/bin/env bash
# One-shot set-up of the compose profile `analytics` (service airflow-init, the analytics image),
# idempotent: the metadata database's schema, the roles of deploy/airflow/roles.json (the FAB
# auth manager of deploy/airflow/airflow.cfg), and an `admin` user whose password is the docker
# secret airflow_admin_password (`users create` leaves an existing user as it is).
set -euo pipefail
airflow db migrate
airflow roles import /opt/stockstream/deploy/airflow/roles.json
password="$(cat /run/secrets/airflow_admin_password)"
if [ -z "$password" ]; then
  echo "airflow-init: the secret airflow_admin_password is empty (deploy/compose/make-secrets.sh)" >&2
  exit 1
fi
airflow users create --username admin --role Admin --firstname Stockstream --lastname Admin \
  --email admin@localhost --password "$password"
echo "airflow-init: database, roles and the admin user are ready"
