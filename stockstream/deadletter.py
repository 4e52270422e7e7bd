"""The one path into `stock-quotes-dlq`, for every stage that gives up on a record.

The aggregation (malformed, invalid, late, internal-error), the archive (archive-failed,
archive-rejected) and the warehouse loader (warehouse-rejected) hand their records to
`DeadLetters`, which builds the contract record (contracts/dead_letters.py), keeps it within
one Kafka record (`DLQ_MAX_RECORD_BYTES`: a 760 KB non-UTF-8 original becomes ~1 MB of base64
plus envelope, which the producer would refuse and the record would be lost), sends it, counts
it in `stockstream_dead_letters_total{reason}` and logs it with the original's coordinates.

A dead letter must be delivered before the source offset of its original is committed: after
the commit the DLQ is the record's only home. `DeadLetterBatch` collects a batch's dead letters
and `deliver()` waits for all of them, sending again (with the project's backoff) what the
broker did not acknowledge. A re-sent dead letter may be a duplicate (the first send may have
arrived): the DLQ is at-least-once and its consumers deduplicate by the original's
(topic, partition, offset).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson

from stockstream.contracts.dead_letters import Reason, dead_letter
from stockstream.metrics import DEAD_LETTER_RETRIES, DEAD_LETTERS
from stockstream.retry import Backoff

log = logging.getLogger(__name__)

#: Queues one DLQ record (key, value) and returns its delivery future.
Send = Callable[[bytes | None, bytes], Awaitable[Awaitable[Any]]]
#: Keys longer than this are replaced by their hash as the DLQ record's key (the original key
#: is in the record).
MAX_KEY_BYTES = 256
# Room for the envelope besides the original key and value (field names, coordinates, time).
_ENVELOPE_BYTES = 1_024
_MAX_ERROR_CHARS = 2_000
RETRY = Backoff(initial_seconds=0.5, max_seconds=30.0)


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
    def __init__(self, send: Send, max_record_bytes: int = 900_000) -> None:
        self._send = send
        self._max_record_bytes = max_record_bytes
        # Every reason's series exists from the start at 0: `increase()` in an alert rule
        # cannot see the first dead letter of a series that appears with it.
        for reason in Reason:
            DEAD_LETTERS.labels(reason.value)

    def batch(self) -> DeadLetterBatch:
        return DeadLetterBatch(self)

    async def send(self, record: SourceRecord, reason: Reason, error: str) -> Awaitable[Any]:
        """Queue the dead letter of one record; returns its delivery future."""
        delivery = await self._queue(record, reason, error, int(time.time() * 1000))
        DEAD_LETTERS.labels(reason.value).inc()
        log.warning(
            "dead-lettered record",
            extra={
                "reason": reason.value,
                "error": error[:_MAX_ERROR_CHARS],
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "symbol": _symbol(record.key),
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
                    "error": error[:_MAX_ERROR_CHARS],
                    "topic": records[0].topic,
                    "partition": records[0].partition,
                    "first_offset": records[0].offset,
                    "last_offset": records[-1].offset,
                    "records": len(records),
                },
            )
        return deliveries

    def encode(
        self, record: SourceRecord, reason: Reason, error: str, failed_at_ms: int
    ) -> tuple[bytes | None, bytes]:
        """(DLQ record key, DLQ record value), within `max_record_bytes`."""
        fields: dict[str, Any] = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "reason": reason,
            "error": error[:_MAX_ERROR_CHARS],
            "failed_at_ms": failed_at_ms,
        }
        key, value = record.key, record.value
        body = orjson.dumps(dead_letter(key=key, value=value, **fields))
        # Too large: cut the key to MAX_KEY_BYTES and the value to what is left after the
        # envelope; base64 grows by 4/3 and JSON escaping can grow text up to 6x, so halve
        # until it fits (a few rounds at most).
        room = (self._max_record_bytes - _ENVELOPE_BYTES - 2 * MAX_KEY_BYTES) * 3 // 4
        while len(body) > self._max_record_bytes:
            body = orjson.dumps(
                dead_letter(
                    key=key,
                    value=value,
                    max_key_bytes=MAX_KEY_BYTES,
                    max_value_bytes=room,
                    **fields,
                )
            )
            room //= 2
        if key is not None and len(key) > MAX_KEY_BYTES:
            key = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
        return key, body

    async def _queue(
        self, record: SourceRecord, reason: Reason, error: str, failed_at_ms: int
    ) -> Awaitable[Any]:
        key, body = self.encode(record, reason, error, failed_at_ms)
        return await self._send(key, body)


class DeadLetterBatch:
    """Dead letters of one batch, delivered together before the batch's offsets commit."""

    def __init__(self, dead_letters: DeadLetters) -> None:
        self._dead_letters = dead_letters
        self._queued: list[tuple[SourceRecord, Reason, str, Awaitable[Any]]] = []

    def __len__(self) -> int:
        return len(self._queued)

    async def add(self, record: SourceRecord, reason: Reason, error: str) -> None:
        """Queue one dead letter; never raises (a failed send is retried by `deliver`)."""
        self._queued.append((record, reason, error, await self._send(record, reason, error)))

    async def _send(self, record: SourceRecord, reason: Reason, error: str) -> Awaitable[Any]:
        try:
            return await self._dead_letters.send(record, reason, error)
        except Exception as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def deliver(self) -> None:
        """Return once every queued dead letter is acknowledged by the broker, sending again
        (with backoff, for as long as it takes) the ones that were not; then start empty."""
        queued, self._queued = self._queued, []
        failures = 0
        while queued:
            results = await asyncio.gather(*(d for *_, d in queued), return_exceptions=True)
            again = [
                (record, reason, error)
                for (record, reason, error, _), result in zip(queued, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if not again:
                return
            DEAD_LETTER_RETRIES.inc(len(again))
            pause = RETRY.delay(failures)
            failures += 1
            first_error = next(r for r in results if isinstance(r, BaseException))
            log.error(
                "dead letters not delivered, sending them again",
                extra={
                    "records": len(again),
                    "attempt": failures,
                    "retry_in_s": round(pause, 3),
                    "error": repr(first_error),
                },
            )
            await asyncio.sleep(pause)
            queued = [(r, reason, e, await self._send(r, reason, e)) for r, reason, e in again]


def _symbol(key: bytes | None) -> str | None:
    return key[:64].decode("utf-8", "replace") if key else None
