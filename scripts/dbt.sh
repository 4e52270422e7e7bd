#!/usr/bin/env bash
# The one way to run the analytics layer: `scripts/dbt.sh <dbt arguments...>`, e.g.
#   scripts/dbt.sh build                       # models + tests on the default target
#   scripts/dbt.sh source freshness            # exit 1 when a source is older than its error_after
#   scripts/dbt.sh docs generate               # lineage in dbt/target/ (catalog.json, manifest.json)
#   DBT_BQ_OFFLINE=true scripts/dbt.sh compile --target bigquery --no-introspect --no-populate-cache
#
# It runs .venv-dbt/bin/dbt (made by scripts/bootstrap.sh; dbt lives in its own virtualenv because
# dbt-core 1.11 pins pathspec below what the dev tools need) with --project-dir/--profiles-dir
# and hands dbt the project's settings, resolved exactly as the worker and the `stockstream`
# command resolve them from the current directory (process environment > ./.env >
# config/<STOCKSTREAM_ENV>.yml > defaults, *_FILE secrets; relative paths such as the default
# data/ are relative to it too) by stockstream.settings in .venv. Run it from the repository root
# unless the settings say otherwise:
#   STOCKSTREAM_DATA_DIR, DUCKDB_PATH     the warehouse file dbt ATTACHes read-only (aggregates_1m)
#   ARCHIVE_LOCAL_DIR, KAFKA_QUOTES_TOPIC the raw archive read with read_parquet (local folder) ...
#   S3_ENDPOINT, S3_BUCKET, S3_REGION,    ... or from S3/MinIO when S3_ENDPOINT is set, the
#   S3_SECURE, S3_ACCESS_KEY, S3_SECRET_KEY   worker's bucket and keys (through s3fs, see README)
#   AGG_WINDOW_SECONDS, AGG_GRACE_SECONDS, AGG_WATERMARK_QUORUM, AGG_EXCLUDED_CONDITIONS
#                                         the window rules the reconciliation test applies
#   ANOMALY_Z_THRESHOLD, ANOMALY_MIN_HISTORY, ANOMALY_HISTORY_WINDOWS, ANOMALY_COOLDOWN_SECONDS
#                                         gold anomalies' rule
#   WAREHOUSE_BACKEND                     the default target (duckdb | bigquery)
#   BQ_PROJECT, BQ_DATASET, BQ_TABLE, BQ_LOCATION, BQ_CREDENTIALS_FILE   the bigquery target
# Variables of this script only (not stockstream settings):
#   DBT_TARGET            target when no --target is given (default: WAREHOUSE_BACKEND, and
#                         duckdb-s3 instead of duckdb when S3_ENDPOINT is set)
#   DBT_DUCKDB_PATH       dbt's own DuckDB file (default <STOCKSTREAM_DATA_DIR>/analytics.duckdb;
#                         DuckDB allows one process per file, so never the worker's file)
#   DBT_ACCEPTED_SYMBOLS  comma-separated symbols the accepted-values test allows (default: any
#                         symbol matching the contract)
#   DBT_BQ_DATASET        BigQuery dataset of the models (default <BQ_DATASET>_analytics)
#   DBT_BQ_ARCHIVE_TABLE  BigQuery (external) table over the archive (default quotes_archive)
#   DBT_BQ_API_ENDPOINT   BigQuery API endpoint (emulators only; a fixed token, no sign-in)
#   DBT_BQ_OFFLINE=true   the same fixed token without an endpoint: for
#                         `compile --target bigquery --no-introspect --no-populate-cache` offline
#   DBT_FRESHNESS_WARN_MINUTES / DBT_FRESHNESS_ERROR_MINUTES   source freshness (10 / 60)
#   DBT_PROJECT_DIR, DBT_PROFILES_DIR     default <repo>/dbt
#   DBT_VENV              default <repo>/.venv-dbt;  STOCKSTREAM_VENV  default <repo>/.venv
# The DuckDB target reads the warehouse file, which the worker holds while it runs: run dbt with
# the worker stopped or with DUCKDB_HOLD_CONNECTION=false on the worker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DBT_VENV="${DBT_VENV:-$ROOT/.venv-dbt}"
MAIN_VENV="${STOCKSTREAM_VENV:-$ROOT/.venv}"
for python in "$DBT_VENV/bin/dbt" "$MAIN_VENV/bin/python"; do
  [ -x "$python" ] || { echo "dbt.sh: $python missing: run scripts/bootstrap.sh" >&2; exit 2; }
done

# Settings -> STOCKSTREAM_DBT_* variables that dbt/profiles.yml and the models read.
exports="$("$MAIN_VENV/bin/python" - <<'PY'
import os
import shlex
import sys

from stockstream.archive.object_store import split_endpoint
from stockstream.settings import SettingsError, load_settings
from stockstream.warehouse.backends import duckdb_path

try:
    s = load_settings()
    a, w, an = s.archive, s.warehouse, s.anomaly
    # The endpoint exactly as the archive's writer reads it (host:port + S3_SECURE, or a URL).
    host, secure = split_endpoint(a.endpoint, a.secure) if a.endpoint else ("", a.secure)
except SettingsError as exc:
    sys.exit(f"dbt.sh: configuration error: {exc}")
data_dir = s.data_dir.resolve()
topic = s.kafka.quotes_topic
if a.endpoint:
    endpoint_url = f"{'https' if secure else 'http'}://{host}"
    archive = f"s3://{a.bucket}/{topic}/**/*.parquet"
else:
    endpoint_url = ""
    archive = str(a.local_dir.resolve() / topic / "**" / "*.parquet")
values = {
    # The archive on S3/MinIO needs the duckdb-s3 target (an S3 file system and its keys).
    "STOCKSTREAM_DBT_TARGET": os.environ.get("DBT_TARGET")
    or ("duckdb-s3" if w.backend == "duckdb" and a.endpoint else w.backend),
    "STOCKSTREAM_DBT_DUCKDB_PATH": os.environ.get("DBT_DUCKDB_PATH")
    or str(data_dir / "analytics.duckdb"),
    "STOCKSTREAM_DBT_WAREHOUSE_PATH": str(duckdb_path(s).resolve()),
    "STOCKSTREAM_DBT_WAREHOUSE_TABLE": w.bq_table,
    "STOCKSTREAM_DBT_ARCHIVE_PATH": archive,
    "STOCKSTREAM_DBT_S3_ENDPOINT_URL": endpoint_url,
    "STOCKSTREAM_DBT_S3_REGION": a.region,
    "STOCKSTREAM_DBT_S3_ANON": "false" if a.access_key.reveal() else "true",
    "DBT_ENV_SECRET_S3_ACCESS_KEY": a.access_key.reveal(),
    "DBT_ENV_SECRET_S3_SECRET_KEY": a.secret_key.reveal(),
    "STOCKSTREAM_DBT_WINDOW_SECONDS": str(s.aggregation.window_seconds),
    "STOCKSTREAM_DBT_GRACE_MS": str(round(s.aggregation.grace_seconds * 1000)),
    "STOCKSTREAM_DBT_WATERMARK_QUORUM": str(s.aggregation.watermark_quorum),
    "STOCKSTREAM_DBT_EXCLUDED_CONDITIONS": ",".join(sorted(s.aggregation.excluded_condition_codes)),
    "STOCKSTREAM_DBT_Z_THRESHOLD": repr(an.z_threshold),
    "STOCKSTREAM_DBT_MIN_HISTORY": str(an.min_history),
    "STOCKSTREAM_DBT_HISTORY_WINDOWS": str(an.history_windows),
    "STOCKSTREAM_DBT_COOLDOWN_SECONDS": repr(an.cooldown_seconds),
    "STOCKSTREAM_DBT_ACCEPTED_SYMBOLS": os.environ.get("DBT_ACCEPTED_SYMBOLS", ""),
    "STOCKSTREAM_DBT_BQ_PROJECT": w.bq_project,
    "STOCKSTREAM_DBT_BQ_SOURCE_DATASET": w.bq_dataset,
    "STOCKSTREAM_DBT_BQ_DATASET": os.environ.get("DBT_BQ_DATASET") or f"{w.bq_dataset}_analytics",
    "STOCKSTREAM_DBT_BQ_ARCHIVE_TABLE": os.environ.get("DBT_BQ_ARCHIVE_TABLE", "quotes_archive"),
    "STOCKSTREAM_DBT_BQ_LOCATION": w.bq_location,
    "STOCKSTREAM_DBT_BQ_KEYFILE": str(w.bq_credentials_file or ""),
    "STOCKSTREAM_DBT_BQ_API_ENDPOINT": os.environ.get("DBT_BQ_API_ENDPOINT", ""),
    "STOCKSTREAM_DBT_FRESHNESS_WARN_MINUTES": os.environ.get("DBT_FRESHNESS_WARN_MINUTES", "10"),
    "STOCKSTREAM_DBT_FRESHNESS_ERROR_MINUTES": os.environ.get("DBT_FRESHNESS_ERROR_MINUTES", "60"),
}
# An empty BQ_PROJECT (application default credentials' project) keeps the profile's default.
if not values["STOCKSTREAM_DBT_BQ_PROJECT"]:
    del values["STOCKSTREAM_DBT_BQ_PROJECT"]
for name, value in values.items():
    print(f"export {name}={shlex.quote(value)}")
PY
)"
eval "$exports"

# A service-account key selects that method; without one, application default credentials. An
# emulator gets a fixed token (no Google sign-in, which is unreachable offline anyway).
if [ -n "$STOCKSTREAM_DBT_BQ_API_ENDPOINT" ] || [ "${DBT_BQ_OFFLINE:-false}" = true ]; then
  export STOCKSTREAM_DBT_BQ_METHOD=oauth-secrets STOCKSTREAM_DBT_BQ_TOKEN=offline
elif [ -n "$STOCKSTREAM_DBT_BQ_KEYFILE" ]; then
  export STOCKSTREAM_DBT_BQ_METHOD=service-account
else
  export STOCKSTREAM_DBT_BQ_METHOD=oauth
fi
mkdir -p "$(dirname "$STOCKSTREAM_DBT_DUCKDB_PATH")"
export DBT_SEND_ANONYMOUS_USAGE_STATS=false
export DBT_PROJECT_DIR="${DBT_PROJECT_DIR:-$ROOT/dbt}"
export DBT_PROFILES_DIR="${DBT_PROFILES_DIR:-$ROOT/dbt}"
exec "$DBT_VENV/bin/dbt" "$@"
