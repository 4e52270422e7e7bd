"""The live chart pages, served by the worker itself (no CDN, no separate server):

- `/chart/`                  the page: one-minute candles, volume, anomaly markers, a symbol
                             picker (static/chart.html, chart.js, chart.css)
- `/chart/events?symbol=S`   server-sent events: `snapshot` (closed candles and markers), then
                             `candle`, `anomaly` and `forming` (the open windows, every second)
- `/chart/history?symbol=S`  the snapshot as JSON
- `/chart/forming?symbol=S`  this worker's open windows of S (what other workers fetch)
- `/chart/symbols`           symbols the chart knows
- `/chart/static/<name>`, `/chart/vendor/<name>`  the page's files; the vendored
                             lightweight-charts build with its LICENSE and NOTICE (VENDORED.md)

Faust's aiohttp driver hands a view the aiohttp request and returns what the view returns to
aiohttp, so the event stream is a plain aiohttp `StreamResponse` prepared in the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import faust
from aiohttp import web as aioweb

from stockstream.settings import Settings
from stockstream.tables.window_state import TABLE_NAME, WindowState
from stockstream.web.candles import check_symbol
from stockstream.web.live import ChartFeed, Subscriber, TooManyClients

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: Every file the chart serves, by URL folder and name: nothing else is reachable.
FILES: dict[tuple[str, str], tuple[Path, str]] = {
    ("static", "chart.js"): (STATIC / "chart.js", "text/javascript"),
    ("static", "chart.css"): (STATIC / "chart.css", "text/css"),
    ("vendor", "lightweight-charts.standalone.production.js"): (
        STATIC / "vendor" / "lightweight-charts.standalone.production.js",
        "text/javascript",
    ),
    ("vendor", "LICENSE"): (STATIC / "vendor" / "LICENSE", "text/plain"),
    ("vendor", "NOTICE"): (STATIC / "vendor" / "NOTICE", "text/plain"),
}
#: Seconds without a frame before a comment line is sent (finds clients that went away).
KEEPALIVE_SECONDS = 15.0
#: A write that takes longer means a client that stopped reading: its stream ends.
WRITE_TIMEOUT_SECONDS = 10.0
#: How long a new stream waits for the history to be read before it starts with what is there.
HISTORY_WAIT_SECONDS = 10.0


def owner_lookup(app: faust.App) -> Any:
    """`partition -> URL` of the worker that owns the window table's partition (another
    worker's only; None for this one or when the group has not told)."""

    def owner(partition: int) -> str | None:
        own = str(app.conf.canonical_url).rstrip("/")
        try:
            hosts = app.router.table_metadata(TABLE_NAME)
        except (KeyError, AttributeError):
            return None
        for url, topics in hosts.items():
            if any(partition in partitions for partitions in topics.values()):
                found = str(url).rstrip("/")
                return None if found == own else found
        return None

    return owner


async def stream_events(request: Any, feed: ChartFeed, symbol: str) -> aioweb.StreamResponse:
    """The event stream of one client, until it goes away, falls behind or the worker stops."""
    try:
        subscriber: Subscriber = feed.subscribe(symbol)
    except TooManyClients as exc:
        return aioweb.json_response({"error": str(exc)}, status=503)
    response = aioweb.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        while True:
            try:
                frame = await asyncio.wait_for(subscriber.next(), KEEPALIVE_SECONDS)
            except TimeoutError:
                frame = b": keepalive\n\n"
            if frame is None:
                break
            try:
                await asyncio.wait_for(response.write(frame), WRITE_TIMEOUT_SECONDS)
            except TimeoutError:
                feed.drop(subscriber, "write stalled")
                break
    except ConnectionError:
        pass  # the browser went away (aiohttp raises a ConnectionResetError subclass)
    finally:
        feed.unsubscribe(subscriber)
    return response


def register(app: faust.App, settings: Settings, state: WindowState) -> ChartFeed:
    """Add the chart pages and their feed (a service of the app) to `app`."""
    feed = ChartFeed(settings, state, owner_lookup(app))
    # Faust's `app.service` is typed for classes but takes instances too.
    app.service(feed)  # type: ignore[arg-type]

    async def end_streams(_: aioweb.Application) -> None:
        feed.close_streams()

    # aiohttp waits for running handlers when it stops: end the streams first.
    web_app: aioweb.Application = app.web.web_app  # type: ignore[attr-defined]
    web_app.on_shutdown.append(end_streams)
    cache: dict[tuple[str, str], bytes] = {}

    def symbol_of(request: Any) -> str | None:
        return check_symbol(request.query.get("symbol"))

    def no_symbol(view: Any) -> Any:
        return view.json({"error": "symbol: 1 to 64 printable characters required"}, status=400)

    @app.page("/chart/")
    async def chart_page(view: Any, request: Any) -> Any:
        return view.html((STATIC / "chart.html").read_text(encoding="utf-8"))

    async def serve(view: Any, folder: str, name: str) -> Any:
        entry = FILES.get((folder, name))
        if entry is None:
            return view.json({"error": "not found"}, status=404)
        if (folder, name) not in cache:
            cache[folder, name] = entry[0].read_bytes()
        headers = {"Cache-Control": "max-age=300"}
        return view.bytes(cache[folder, name], content_type=entry[1], headers=headers)

    @app.page("/chart/static/{name}")
    async def chart_static(view: Any, request: Any, name: str) -> Any:
        return await serve(view, "static", name)

    @app.page("/chart/vendor/{name}")
    async def chart_vendor(view: Any, request: Any, name: str) -> Any:
        return await serve(view, "vendor", name)

    @app.page("/chart/symbols")
    async def chart_symbols(view: Any, request: Any) -> Any:
        feed.ensure_running()
        return view.json({"symbols": feed.symbols(), "loading": not feed.ready.is_set()})

    @app.page("/chart/history")
    async def chart_history(view: Any, request: Any) -> Any:
        symbol = symbol_of(request)
        if symbol is None:
            return no_symbol(view)
        feed.ensure_running()
        await _wait(feed.ready, HISTORY_WAIT_SECONDS)
        return view.json(feed.snapshot(symbol))

    @app.page("/chart/forming")
    async def chart_forming(view: Any, request: Any) -> Any:
        symbol = symbol_of(request)
        if symbol is None:
            return no_symbol(view)
        # Local only: the asking worker routes, so a request never travels further.
        return view.json(feed.forming.local(symbol))

    @app.page("/chart/events")
    async def chart_events(view: Any, request: Any) -> Any:
        symbol = symbol_of(request)
        if symbol is None:
            return no_symbol(view)
        feed.ensure_running()
        await _wait(feed.ready, HISTORY_WAIT_SECONDS)
        return await stream_events(request, feed, symbol)

    return feed


async def _wait(event: asyncio.Event, seconds: float) -> None:
    # On timeout the page is served from what is there; a fresh snapshot follows once the
    # history is read.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
