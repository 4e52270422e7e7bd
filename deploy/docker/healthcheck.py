"""The image's health check: exit 0 when a URL answers 2xx within the timeout, else 1.

Without an argument it asks the worker's liveness page, `/health/` on STOCKSTREAM_WEB_PORT
(6066), over loopback, which answers whatever STOCKSTREAM_WEB_HOST binds (0.0.0.0 or
127.0.0.1). The compose stack passes the producer's metrics URL for the producer. Python's
standard library only: the runtime image has no curl or wget.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping


def default_url(environ: Mapping[str, str] = os.environ) -> str:
    port = environ.get("STOCKSTREAM_WEB_PORT", "").strip() or "6066"
    return f"http://127.0.0.1:{port}/health/"


def check(url: str, timeout: float) -> str | None:
    """None when healthy, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return repr(exc)
    return None if 200 <= status < 300 else f"HTTP {status}"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url()
    problem = check(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_SECONDS", "4")))
    if problem is not None:
        print(f"unhealthy: {url}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
