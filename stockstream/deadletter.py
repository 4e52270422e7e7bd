"""The one path into `stock-quotes-dlq`, for every stage that gives up on a record.

The aggregation (malformed, invalid, late, internal-error), the archive (archive-failed) and
the warehouse loader (warehouse-rejected) all hand their records to `DeadLetters`, which builds
the contract record (contracts/dead_letters.py), sends it, counts it in
`stockstream_dead_letters_total{reason}` and logs it with the original's coordinates.

`send` returns the delivery future: a caller that commits its source offsets itself (the
archive, the warehouse loader) awaits it first, because after the commit the DLQ is the
record's only home. Inside the aggregation agent Faust flushes its producer before it commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson

from stockstream.contracts.dead_letters import Reason, dead_letter
from stockstream.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

#: Queues one DLQ record (key, value) and returns its delivery future.
Send = Callable[[bytes | None, bytes], Awaitable[Awaitable[Any]]]


class SourceRecord(Protocol):
    """What a dead letter needs of the original (an aiokafka `ConsumerRecord` or a Faust
    message has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class DeadLetters:
    def __init__(self, send: Send) -> None:
        self._send = send

    async def send(self, record: SourceRecord, reason: Reason, error: str) -> Awaitable[Any]:
        """Queue the dead letter of one record; returns its delivery future."""
        delivery = await self._queue(record, reason, error, int(time.time() * 1000))
        DEAD_LETTERS.labels(reason.value).inc()
        log.warning(
            "dead-lettered record",
            extra={
                "reason": reason.value,
                "error": error,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "symbol": record.key.decode("utf-8", "replace") if record.key else None,
            },
        )
        return delivery

    async def send_many(
        self, records: Sequence[SourceRecord], reason: Reason, error: str
    ) -> list[Awaitable[Any]]:
        """Queue the dead letters of a batch with one log line (a failed archive batch can be
        thousands of records); returns their delivery futures."""
        now_ms = int(time.time() * 1000)
        deliveries = [await self._queue(r, reason, error, now_ms) for r in records]
        DEAD_LETTERS.labels(reason.value).inc(len(records))
        if records:
            log.warning(
                "dead-lettered records",
                extra={
                    "reason": reason.value,
                    "error": error,
                    "topic": records[0].topic,
                    "partition": records[0].partition,
                    "first_offset": records[0].offset,
                    "last_offset": records[-1].offset,
                    "records": len(records),
                },
            )
        return deliveries

    async def _queue(
        self, record: SourceRecord, reason: Reason, error: str, failed_at_ms: int
    ) -> Awaitable[Any]:
        body = dead_letter(
            key=record.key,
            value=record.value,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            error=error,
            failed_at_ms=failed_at_ms,
        )
        return await self._send(record.key, orjson.dumps(body))
