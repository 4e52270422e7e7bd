#!/usr/bin/env bash
# Regenerates the image's locked, hash-checked requirements (deploy/docker/requirements*.txt).
# The versions are those of the project's virtualenvs, the ones the test suite ran with
# (.venv for stockstream, .venv-dbt for dbt when it exists), so the image runs what was tested.
# Wheels only, for linux/amd64 with Python 3.11 (the image's base): faust-streaming publishes no
# arm64 wheel, and building it would bring a compiler into the image build (README, "Docker").
# Needs `uv` (PyPI) on PATH or in UV; run it after changing dependencies in pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
UV="${UV:-uv}"
command -v "$UV" >/dev/null || { echo "lock.sh: needs uv (pip install uv) or UV=/path/to/uv" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
compile() {  # <input> <output> <venv whose versions pin the result>
  : >"$tmp/constraints.txt"
  if [ -x "$3/bin/pip" ]; then "$3/bin/pip" freeze --exclude-editable >"$tmp/constraints.txt"; fi
  "$UV" pip compile "$1" --constraint "$tmp/constraints.txt" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --only-binary :all: \
    --generate-hashes --no-annotate --quiet --custom-compile-command "deploy/docker/lock.sh" \
    -o "$2"
}
compile pyproject.toml deploy/docker/requirements.txt .venv
compile deploy/docker/requirements-dbt.in deploy/docker/requirements-dbt.txt .venv-dbt
