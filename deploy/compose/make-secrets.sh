#!/bin/sh
# Creates the docker secrets docker-compose.yml reads, in deploy/compose/secrets/ (or the folder
# given as the first argument / STOCKSTREAM_SECRETS_DIR). Only missing files are written, so it
# never changes a credential a running stack uses; delete a file to have it generated anew.
#
# Generated: MinIO's root account and the two least-privilege archive users (minio-init creates
# them), the Redis ACL and the matching REDIS_URL, the worker's web token, Grafana's admin
# password, and for the `analytics` profile Airflow's database password and URL, JWT and API
# secrets and its admin password.
# Created empty, to be filled in by you: finnhub_api_key (empty = the producer simulates quotes),
# slack_webhook_url and pagerduty_routing_key (empty = that receiver is off).
#
# The folder is 0700 and the files 0644 on purpose: docker compose (outside swarm) bind-mounts
# each file as it is, and the services read it as their own non-root users (redis, the worker's
# uid 10001, grafana, ...), so the files must be readable by any uid while the folder keeps them
# from other users of this machine.
set -eu
dir="${1:-${STOCKSTREAM_SECRETS_DIR:-$(dirname "$0")/secrets}}"
mkdir -p "$dir"
chmod 0700 "$dir"

random_hex() {  # <bytes>: hex characters only, safe in URLs, ACL files and shells
  od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

put() {  # <name> <value>: writes the secret unless it exists
  if [ ! -e "$dir/$1" ]; then
    printf '%s' "$2" >"$dir/$1"
    chmod 0644 "$dir/$1"
    echo "created $dir/$1"
  fi
}

put minio_root_user "root-$(random_hex 4)"
put minio_root_password "$(random_hex 24)"
put archive_access_key "archive-$(random_hex 4)"
put archive_secret_key "$(random_hex 24)"
put analytics_access_key "analytics-$(random_hex 4)"
put analytics_secret_key "$(random_hex 24)"
put web_token "$(random_hex 24)"
put grafana_admin_password "$(random_hex 16)"
put airflow_jwt_secret "$(random_hex 32)"
put airflow_api_secret_key "$(random_hex 32)"
put airflow_admin_password "$(random_hex 16)"
put finnhub_api_key ""
put slack_webhook_url ""
put pagerduty_routing_key ""

# The ACL and the URL carry the same password: written together or not at all.
if [ ! -e "$dir/redis_acl" ] || [ ! -e "$dir/redis_url" ]; then
  rm -f "$dir/redis_acl" "$dir/redis_url"
  password="$(random_hex 24)"
  # `default` (no password) may only PING, for the health check; `stockstream` reaches only the
  # producer's keys (stockstream:*), with the commands the quote cache and the websocket lease
  # use (GET, SET, DEL, PEXPIRE inside EVAL scripts) and no administrative or dangerous one.
  put redis_acl "user default on nopass -@all +ping
user stockstream on >$password ~stockstream:* resetchannels -@all +@read +@write +@scripting +@connection -@dangerous
"
  put redis_url "redis://stockstream:$password@redis:6379/0"
fi

# PostgreSQL's password and Airflow's connection URL: the same pair rule.
if [ ! -e "$dir/airflow_db_password" ] || [ ! -e "$dir/airflow_db_url" ]; then
  rm -f "$dir/airflow_db_password" "$dir/airflow_db_url"
  password="$(random_hex 24)"
  put airflow_db_password "$password"
  put airflow_db_url "postgresql+psycopg2://airflow:$password@airflow-db:5432/airflow"
fi
