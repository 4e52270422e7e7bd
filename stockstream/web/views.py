"""The worker's web server: health, readiness, metrics and the inspection pages, on Faust's.

- `/health/`  liveness: answers while the event loop runs, with each dependency's state.
- `/ready/`   readiness: 503 naming the dependency it needs that is down (health.py).
- `/metrics/` Prometheus text format (stockstream's registry, with the worker's child
  processes' figures added: child_metrics.py).
- `/`, `/symbol/`, `/symbols/`, `/partitions/` and their `/api/` JSON: inspection.py.
- `/windows/` open windows and clock of each partition this worker owns (JSON).
- Faust's `/table/`, `/router/` (and its debug views when enabled) need the bearer token
  (auth.py).

This module only wires: it turns the Faust app into what the other modules take (callables
over the assignor, router and producer), so each of them can be tested without a worker.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, cast

import faust
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stockstream.child_metrics import WORKER_METRICS
from stockstream.contracts.quotes import QuoteValidator
from stockstream.contracts.timestamps import iso_utc
from stockstream.settings import Settings
from stockstream.tables.window_state import TABLE_NAME, WindowState
from stockstream.web import auth, health
from stockstream.web.cluster import Cluster
from stockstream.web.inspection import Handler, Inspection
from stockstream.web.recent import RecentWindows

log = logging.getLogger(__name__)


def register(app: faust.App, settings: Settings, state: WindowState, recent: RecentWindows) -> None:
    """Add the pages to `app`'s web server; `recent` must be fed by the window emitter."""
    quotes_topic = settings.kafka.quotes_topic

    def owned() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == quotes_topic}

    async def revoked(app_: Any, partitions: Any, **kwargs: Any) -> None:
        recent.forget({tp.partition for tp in partitions if tp.topic == quotes_topic})

    app.on_partitions_revoked.connect(revoked)  # type: ignore[arg-type]
    _web_app(app).middlewares.append(auth.middleware(settings.worker.web_token))

    probes: list[health.Probe] = [
        health.BrokerProbe(lambda: sorted(owned()), lambda: bool(app.rebalancing), _producer(app)),
        functools.partial(health.object_store, settings.archive.enabled),
        functools.partial(health.warehouse, settings.warehouse.enabled),
    ]

    async def health_page(request: web.Request) -> web.Response:
        found = await health.check(probes)
        return _json(health.health_body(settings.worker.app_id, found), 200)

    async def ready_page(request: web.Request) -> web.Response:
        status, body = health.ready_body(await health.check(probes))
        return _json(body, status)

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(WORKER_METRICS),  # type: ignore[arg-type]
            content_type=CONTENT_TYPE_LATEST.split(";")[0],
        )

    async def windows_page(request: web.Request) -> web.Response:
        body = {}
        for partition, windows in sorted(state.loaded().items()):
            clock = windows.clock
            body[str(partition)] = {
                "watermark": iso_utc(clock.watermark_ms) if clock.watermark_ms >= 0 else None,
                "last_offset": clock.last_offset,
                "open": [
                    {**w.to_record(), "last_offset": w.last_offset}
                    for w in sorted(windows.open.values(), key=lambda w: (w.start_ms, w.symbol))
                ],
            }
        return _json(body, 200)

    cluster = Cluster(
        lambda: app.conf.canonical_url,
        lambda: app.router.table_metadata(TABLE_NAME),
        lambda: app.http_client,  # type: ignore[return-value]
        settings.kafka.partitions,
    )
    inspection = Inspection(
        settings.worker.app_id,
        cluster,
        state,
        recent,
        QuoteValidator.from_settings(settings.quotes),
        owned,
        settings.aggregation.idle_timeout_seconds,
    )
    pages: list[tuple[str, Handler]] = [
        ("/health/", health_page),
        ("/ready/", ready_page),
        ("/metrics/", metrics_page),
        ("/windows/", windows_page),
        *inspection.routes(),
    ]
    for path, handler in pages:
        _page(app, path, handler)


def _page(app: faust.App, path: str, handler: Handler) -> None:
    # Faust's views call `get(view, request, **match_info)`; ours read the request only.
    async def get(view: Any, request: web.Request, **match_info: Any) -> web.StreamResponse:
        return await handler(request)

    app.page(path, name=f"stockstream:{path}")(cast(Any, get))


def _web_app(app: faust.App) -> web.Application:
    # The aiohttp application under Faust's web driver (its only driver); a middleware added
    # before the server starts applies to every route, Faust's own included.
    return cast(web.Application, app.web.web_app)  # type: ignore[attr-defined]


def _producer(app: faust.App) -> Any:
    async def reachable() -> bool:
        # The aiokafka producer under Faust's; raises NotReady until the worker started it.
        client = app.producer._ensure_producer().client  # type: ignore[attr-defined]
        return bool(await client.force_metadata_update())

    return reachable


def _json(body: Any, status: int) -> web.Response:
    return web.json_response(body, status=status)
