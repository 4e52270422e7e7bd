#!/bin/sh
# One-shot set-up of MinIO for the compose stack (service minio-init, image minio/mc), idempotent:
# the archive bucket, and two users that are not the root account:
#   archive writer   (the worker: S3_ACCESS_KEY_FILE / S3_SECRET_KEY_FILE) - archive-writer.json:
#                    list the bucket, put and get its objects, abort its own failed multipart
#                    uploads; no delete (the archive only ever adds or rewrites whole objects),
#                    no other bucket, no bucket or admin operation
#   analytics reader (Airflow/dbt, profile `analytics`) - analytics-reader.json: list and get
# Every credential is a docker secret file; the root one reaches mc through MC_HOST_local, an
# environment variable of this process only (not of the container's definition).
set -eu
secrets=/run/secrets
here="$(dirname "$0")"
bucket="${S3_BUCKET:?S3_BUCKET is required}"
endpoint="${MINIO_ENDPOINT:-minio:9000}"

secret() {
  value="$(cat "$secrets/$1")"
  if [ -z "$value" ]; then
    echo "minio-init: the secret $1 is empty (run deploy/compose/make-secrets.sh)" >&2
    exit 1
  fi
  printf '%s' "$value"
}

MC_HOST_local="http://$(secret minio_root_user):$(secret minio_root_password)@$endpoint"
export MC_HOST_local

mc ready local
mc mb --ignore-existing "local/$bucket"
# The policies name the bucket: refuse to grant one that does not match S3_BUCKET.
for policy in archive-writer analytics-reader; do
  case "$(cat "$here/$policy.json")" in
    *"arn:aws:s3:::$bucket/*"*) ;;
    *) echo "minio-init: $policy.json does not name the bucket $bucket" >&2; exit 1 ;;
  esac
  mc admin policy create local "stockstream-$policy" "$here/$policy.json"
done

user() {  # <access key secret> <secret key secret> <policy>
  access="$(secret "$1")"
  mc admin user add local "$access" "$(secret "$2")"
  # Attaching a policy the user already has is an error for mc: say so, and go on.
  if ! out="$(mc admin policy attach local "stockstream-$3" --user "$access" 2>&1)"; then
    case "$out" in
      *"already"*) echo "policy stockstream-$3 already attached to $access" ;;
      *) echo "$out" >&2; exit 1 ;;
    esac
  else
    echo "$out"
  fi
}
user archive_access_key archive_secret_key archive-writer
user analytics_access_key analytics_secret_key analytics-reader
echo "minio-init: bucket $bucket and its users are ready"
