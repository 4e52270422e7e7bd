"""The inspection pages and their JSON: per symbol, the list of symbols, per partition.

Every page has two forms: `/api/...` answers JSON for machines, the same path without `/api`
answers HTML for people (pages.py). A symbol or a partition is answered by the worker that owns
its partition, whichever worker was asked (cluster.py forwards the request), so every worker
gives the same answer. The lists (`/symbols/`, `/partitions/`) ask every owner for its
partitions (`?scope=local`) and merge; a worker that does not answer is named in `errors` and
its partitions carry an `error`, the rest is still shown.

    /                          index (HTML)
    /symbol/?symbol=S&last=N   open window(s) and the last N closed windows of S (N <= 500)
    /symbols/                  every symbol with its open window, partition and owner
    /partitions/               per partition: watermark, idle state, open windows, offsets
    /partitions/<p>/           one partition, with its symbols' open windows
    /style.css                 the pages' stylesheet
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from stockstream.contracts.quotes import ContractError, QuoteValidator
from stockstream.tables.window_state import WindowState
from stockstream.web import pages, snapshots
from stockstream.web.cluster import FORWARDED_HEADER, Cluster, gather_json, partition_of
from stockstream.web.recent import MAX_PER_SYMBOL, RecentWindows

DEFAULT_LAST = 20
#: Scripts, frames, forms posting elsewhere: none of it; styles only from this server.
CSP = "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body),
        status=status,
        content_type="application/json",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def parse_last(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LAST
    if len(raw) > 6 or not raw.isdigit() or not 1 <= int(raw) <= MAX_PER_SYMBOL:
        raise BadRequest(400, f"last must be a whole number from 1 to {MAX_PER_SYMBOL}")
    return int(raw)


class Inspection:
    def __init__(
        self,
        app_id: str,
        cluster: Cluster,
        state: WindowState,
        recent: RecentWindows,
        validator: QuoteValidator,
        owned: Callable[[], set[int]],
        idle_timeout_seconds: float,
    ) -> None:
        self.app_id = app_id
        self.cluster = cluster
        self.state = state
        self.recent = recent
        self.validator = validator
        self.owned = owned
        self.idle_timeout = idle_timeout_seconds

    def routes(self) -> list[tuple[str, Handler]]:
        """(path, GET handler) of every page."""
        return [
            ("/", self.index),
            ("/style.css", self.css),
            ("/symbol/", self._html(self.symbol)),
            ("/api/symbol/", self._json(self.symbol)),
            ("/symbols/", self._html(self.symbols)),
            ("/api/symbols/", self._json(self.symbols)),
            ("/partitions/", self._html(self.partitions)),
            ("/api/partitions/", self._json(self.partitions)),
            ("/partitions/{partition}/", self._html(self.partition)),
            ("/api/partitions/{partition}/", self._json(self.partition)),
        ]

    # -- this worker's own state -------------------------------------------------------------

    def local_partition(self, partition: int) -> dict[str, Any]:
        windows = self.state.get(partition)
        activity = self.state.last_activity.get(partition)
        quiet = None if windows is None or activity is None else time.monotonic() - activity
        snap = snapshots.partition_snapshot(
            partition, windows, self.recent, quiet, self.idle_timeout
        )
        return {**snap, "owner": self.cluster.url}

    def local_symbol(self, symbol: str, partition: int, last: int) -> dict[str, Any]:
        view = snapshots.symbol_view(
            symbol, partition, self.state.get(partition), self.recent, last
        )
        return {**view, "served_by": self.cluster.url}

    # -- handlers ------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return html_response(pages.index_page(self.app_id, self.cluster.url))

    async def css(self, request: web.Request) -> web.Response:
        return web.Response(text=pages.CSS, content_type="text/css")

    async def symbol(self, request: web.Request, kind: str) -> web.Response:
        try:
            symbol = self.validator.check_symbol(request.query.get("symbol", ""))
        except ContractError as exc:
            raise BadRequest(400, exc.error) from None
        last = parse_last(request.query.get("last"))
        partition = partition_of(symbol, self.cluster.partitions)
        routed = await self._route(request, partition)
        if routed is not None:
            return routed
        view = self.local_symbol(symbol, partition, last)
        return json_response(view) if kind == "json" else html_response(pages.symbol_page(view))

    async def partition(self, request: web.Request, kind: str) -> web.Response:
        raw = request.match_info.get("partition", "")
        if len(raw) > 6 or not raw.isdigit() or int(raw) >= self.cluster.partitions:
            raise BadRequest(404, f"no partition {raw[:20]!r}")
        partition = int(raw)
        routed = await self._route(request, partition)
        if routed is not None:
            return routed
        snap = self.local_partition(partition)
        return json_response(snap) if kind == "json" else html_response(pages.partition_page(snap))

    async def partitions(self, request: web.Request, kind: str) -> web.Response:
        snaps, errors = await self._all_partitions(request)
        if kind == "json":
            return json_response({"partitions": snaps, "errors": errors})
        return html_response(pages.partitions_page(snaps, errors))

    async def symbols(self, request: web.Request, kind: str) -> web.Response:
        snaps, errors = await self._all_partitions(request)
        rows = snapshots.symbol_rows(s for s in snaps if "error" not in s)
        if kind == "json":
            return json_response({"symbols": rows, "errors": errors})
        return html_response(pages.symbols_page(rows, errors))

    # -- routing -------------------------------------------------------------------------------

    async def _route(self, request: web.Request, partition: int) -> web.Response | None:
        """The owner's answer when another worker owns `partition`; None to answer here."""
        owner = self.cluster.owner(partition)
        forwarded = FORWARDED_HEADER in request.headers
        if owner is None or forwarded or self.cluster.is_self(owner):
            if partition in self.owned():
                return None
            why = "has no owner right now" if owner is None else "is not owned by this worker"
            raise BadRequest(503, f"partition {partition} {why} (rebalancing?); try again")
        try:
            answer = await self.cluster.get(owner, str(request.rel_url), request.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BadRequest(
                502, f"the owner of partition {partition}, {owner}, did not answer: {exc!r}"
            ) from None
        headers = {"X-Content-Type-Options": "nosniff"}
        if answer.content_type == "text/html":
            headers["Content-Security-Policy"] = CSP
        return web.Response(
            body=answer.body,
            status=answer.status,
            content_type=answer.content_type,
            headers=headers,
        )

    async def _all_partitions(self, request: web.Request) -> tuple[list[dict[str, Any]], list[str]]:
        """Every partition's snapshot, each from its owner (only this worker's own with
        `?scope=local` or when the request was forwarded)."""
        mine = sorted(self.owned())
        local = {p: self.local_partition(p) for p in mine}
        if request.query.get("scope") == "local" or FORWARDED_HEADER in request.headers:
            return [local[p] for p in mine], []
        owners = self.cluster.owners()
        others = sorted({u for u in owners.values() if not self.cluster.is_self(u)})
        answers = await gather_json(
            self.cluster, others, "/api/partitions/?scope=local", request.headers
        )
        errors = [a["error"] for a in answers.values() if "error" in a]
        found: dict[int, dict[str, Any]] = {}
        for answer in answers.values():
            for snap in answer.get("partitions", []) if isinstance(answer, dict) else []:
                if isinstance(snap, dict) and isinstance(snap.get("partition"), int):
                    found[snap["partition"]] = snap
        out = []
        for partition in range(self.cluster.partitions):
            owner = owners.get(partition)
            if partition in local and (owner is None or self.cluster.is_self(owner)):
                out.append(local[partition])
            elif owner is not None and partition in found:
                out.append(found[partition])
            else:
                why = "unassigned" if owner is None else f"no answer about it from {owner}"
                out.append({"partition": partition, "owner": owner, "error": why})
        return out, errors

    # -- adapters ------------------------------------------------------------------------------

    def _json(self, page: Callable[[web.Request, str], Awaitable[web.Response]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            try:
                return await page(request, "json")
            except BadRequest as exc:
                return json_response({"error": exc.message}, exc.status)

        return handler

    def _html(self, page: Callable[[web.Request, str], Awaitable[web.Response]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            try:
                return await page(request, "html")
            except BadRequest as exc:
                return html_response(pages.error_page(exc.status, exc.message), exc.status)

        return handler
