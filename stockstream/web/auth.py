"""Which web endpoints need `Authorization: Bearer <STOCKSTREAM_WEB_TOKEN>`, and the check.

Read-only views of what the pipeline computes are open: `/`, the inspection pages and their
JSON, `/health/`, `/ready/`, `/metrics/`, `/windows/`. Faust's own views expose internals --
`/table/` dumps raw table keys and values, `/router/` the cluster's hosts and partition
assignment, and `/graph/`, `/stats/`, `/assignment/`, `/performance/` when enabled -- so they
need the token, as will any endpoint that changes state. With no token configured those are
refused (403, saying to set STOCKSTREAM_WEB_TOKEN) rather than left open.

The rule is an aiohttp middleware that looks at the route the request *matched* (its
pattern), not at the raw path, so no spelling of a URL (`//table/`, percent-escapes) slips
past it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_urldispatcher import MatchInfoError

from stockstream.settings import Secret

#: Route patterns (by prefix) that need the token.
PROTECTED_PREFIXES = ("/table", "/router", "/graph", "/stats", "/assignment", "/performance")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_protected(pattern: str) -> bool:
    return any(
        pattern == prefix or pattern.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES
    )


def refusal(token: Secret, authorization: str | None) -> tuple[int, str] | None:
    """None when `authorization` (the header's value) carries the configured token, else the
    (status, message) to answer."""
    if not token:
        return 403, "this endpoint is disabled: set STOCKSTREAM_WEB_TOKEN to enable it"
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401, "this endpoint needs 'Authorization: Bearer <STOCKSTREAM_WEB_TOKEN>'"
    if not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
        return 401, "wrong token"
    return None


def _pattern(request: web.Request) -> str | None:
    info = request.match_info
    if isinstance(info, MatchInfoError):
        return None  # 404/405: nothing is served
    resource = info.route.resource
    return resource.canonical if resource is not None else None


def middleware(token: Secret) -> Middleware:
    """The aiohttp middleware enforcing the token on protected routes."""

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        pattern = _pattern(request)
        if pattern is not None and is_protected(pattern):
            refused = refusal(token, request.headers.get("Authorization"))
            if refused is not None:
                status, message = refused
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
                return web.Response(
                    status=status,
                    text=json.dumps({"error": message}),
                    content_type="application/json",
                    headers=headers,
                )
        return await handler(request)

    return require_token
