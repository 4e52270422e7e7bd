"""Sending records to `stock-quotes-dlq`: one path for every stage that rejects a record."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from stockstream.contracts import Reason, dead_letter
from stockstream.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)


async def send_dead_letter(
    dlq_topic: Any,
    *,
    key: bytes | None,
    value: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    reason: Reason,
    error: str,
) -> None:
    """Queue a dead letter on the Faust producer (flushed before the source offset commits)."""
    record = dead_letter(
        key=key,
        value=value,
        topic=topic,
        partition=partition,
        offset=offset,
        reason=reason,
        error=error,
        failed_at_ms=int(time.time() * 1000),
    )
    await dlq_topic.send(key=key, value=orjson.dumps(record))
    DEAD_LETTERS.labels(reason.value).inc()
    log.warning(
        "dead-lettered record",
        extra={
            "reason": reason.value,
            "error": error,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "symbol": key.decode("utf-8", "replace") if key else None,
        },
    )
