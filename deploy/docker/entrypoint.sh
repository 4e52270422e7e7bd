#!/bin/sh
# The image's entry point. First argument:
#   worker (the default)  the stream processor: faust -A stockstream worker -l <FAUST_LOG_LEVEL>
#   producer              stockstream produce: --source finnhub (or STOCKSTREAM_LIVE_SOURCE, e.g.
#                         finnhub-ws) when the Finnhub key file holds a key, else --source simulate;
#                         a --source among the extra arguments wins
#   anything else         run as given (stockstream topics, stockstream tail aggregated, sh, ...)
# The key file is FINNHUB_API_KEY_FILE, else the docker secret /run/secrets/finnhub_api_key. The
# compose stack always mounts that secret so it can be created empty: empty means "no key".
# STOCKSTREAM_ENTRYPOINT_DRY_RUN=1 prints the command, one argument per line, instead of running
# it (tests/unit/test_compose.py).
set -eu

run() {
  if [ -n "${STOCKSTREAM_ENTRYPOINT_DRY_RUN:-}" ]; then
    printf '%s\n' "$@"
    exit 0
  fi
  exec "$@"
}

has_source() {
  for arg in "$@"; do
    case "$arg" in
      --source | --source=*) return 0 ;;
    esac
  done
  return 1
}

command="${1:-worker}"
[ $# -gt 0 ] && shift

case "$command" in
  worker)
    run faust -A stockstream worker -l "${FAUST_LOG_LEVEL:-info}" "$@"
    ;;
  producer)
    if has_source "$@"; then
      run stockstream produce "$@"
    fi
    key_file="${FINNHUB_API_KEY_FILE:-/run/secrets/finnhub_api_key}"
    # A key is a non-blank line: an empty placeholder secret keeps the simulator.
    if [ -r "$key_file" ] && grep -q '[^[:space:]]' "$key_file"; then
      export FINNHUB_API_KEY_FILE="$key_file"
      run stockstream produce --source "${STOCKSTREAM_LIVE_SOURCE:-finnhub}" "$@"
    fi
    # Without a key the empty secret must not be read as one (the settings would accept "").
    unset FINNHUB_API_KEY_FILE
    run stockstream produce --source simulate "$@"
    ;;
  *)
    run "$command" "$@"
    ;;
esac
