#!/usr/bin/env bash
# Re-fetches the vendored TradingView lightweight-charts build that the worker serves at
# /chart/vendor/ (stockstream/web/static/vendor/, see VENDORED.md there) from the npm registry,
# and checks it against the recorded sha256.
#
#   scripts/vendor_chart.sh            re-fetch the recorded version; fails if its sha256 differs
#   scripts/vendor_chart.sh 5.3.0      update to another version: prints the new sha256, to be
#                                      recorded (with the version) in VENDORED.md and below
set -euo pipefail
cd "$(dirname "$0")/.."

RECORDED_VERSION=5.2.1
RECORDED_SHA256=e21cc5caa0226ef30bd8549c50b9ef926615f2a4ee6b4e486353477a55f598cf
BUILD=lightweight-charts.standalone.production.js
DEST=stockstream/web/static/vendor

version=${1:-$RECORDED_VERSION}
command -v npm >/dev/null || { echo "vendor_chart.sh: npm is needed (apt-get install npm)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "lightweight-charts@$version" >/dev/null)
tar -xzf "$work"/lightweight-charts-"$version".tgz -C "$work"
sha=$(sha256sum "$work/package/dist/$BUILD" | cut -d' ' -f1)
if [ "$version" = "$RECORDED_VERSION" ] && [ "$sha" != "$RECORDED_SHA256" ]; then
  echo "vendor_chart.sh: $BUILD of $version has sha256 $sha, recorded $RECORDED_SHA256" >&2
  exit 1
fi
cp "$work/package/dist/$BUILD" "$DEST/$BUILD"
cp "$work/package/LICENSE" "$DEST/LICENSE"
# The npm package carries no NOTICE file: $DEST/NOTICE is the one of the GitHub repository
# (tradingview/lightweight-charts); check that it still reads the same when updating.
echo "$BUILD $version sha256 $sha -> $DEST"
if [ "$version" != "$RECORDED_VERSION" ]; then
  echo "record version $version and sha256 $sha in $DEST/VENDORED.md and in this script" >&2
fi
