"""Health, readiness, Prometheus metrics and a view of the open windows.

- `/health/`  liveness: the worker's event loop answers.
- `/ready/`   readiness: the consumer has partitions assigned and is not rebalancing.
- `/metrics/` Prometheus text format (stockstream's registry).
- `/windows/` open windows and clock of each partition this worker owns.
- `/table/window-state/` Faust's own table view (raw keys and values).
"""

from __future__ import annotations

from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stockstream.contracts.timestamps import iso_utc
from stockstream.metrics import REGISTRY
from stockstream.settings import Settings
from stockstream.tables.window_state import WindowState


def register(app: faust.App, settings: Settings, state: WindowState) -> None:
    """Add the pages to `app`'s web server."""
    quotes_topic = settings.kafka.quotes_topic

    @app.page("/health/")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok", "app": settings.worker.app_id})

    @app.page("/ready/")
    async def ready(web: Any, request: Any) -> Any:
        assigned = sorted(
            tp.partition for tp in app.assignor.assigned_actives() if tp.topic == quotes_topic
        )
        rebalancing = bool(app.rebalancing)
        ok = bool(assigned) and not rebalancing
        body = {"ready": ok, "partitions": assigned, "rebalancing": rebalancing}
        return web.json(body, status=200 if ok else 503)

    @app.page("/metrics/")
    async def metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/windows/")
    async def open_windows(web: Any, request: Any) -> Any:
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
        return web.json(body)
