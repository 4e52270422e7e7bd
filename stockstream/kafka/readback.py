"""Reading part of one partition directly, without a consumer group: what the aggregation
emitted after its last checkpoint (`read_after`), and records the worker's stream skipped
(`read_range`, and `read_missing`, which an agent cannot go on without)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition

from stockstream.kafka import clients
from stockstream.retry import Backoff, retry
from stockstream.settings import KafkaSettings

log = logging.getLogger(__name__)

#: `read_after`'s signature, for code that takes it as a parameter.
ReadAfter = Callable[
    [KafkaSettings, str, int, int], Awaitable[tuple[list[tuple[int, bytes | None]], int]]
]
#: `read_range`'s signature.
ReadRange = Callable[[KafkaSettings, str, int, int, int], Awaitable[list[Any]]]
#: Between attempts of a read an agent waits for (the broker away).
READ_BACKOFF = Backoff(initial_seconds=0.5, max_seconds=30.0)


async def read_after(
    kafka: KafkaSettings, topic: str, partition: int, after_offset: int
) -> tuple[list[tuple[int, bytes | None]], int]:
    """(offset, value) of every record of `topic`/`partition` after `after_offset` up to the end
    offset seen at start, and the highest offset read (`after_offset` when there was none)."""
    records = await _read(kafka, topic, partition, after_offset + 1, None)
    last = records[-1].offset if records else after_offset
    log.info(
        "read back partition",
        extra={"topic": topic, "partition": partition, "offset": last, "records": len(records)},
    )
    return [(r.offset, r.value) for r in records], last


async def read_range(
    kafka: KafkaSettings, topic: str, partition: int, first: int, last: int
) -> list[Any]:
    """The records (aiokafka `ConsumerRecord`s) with `first <= offset <= last` that exist
    (an offset may be a transaction marker, or compacted away)."""
    return [r for r in await _read(kafka, topic, partition, first, last + 1) if r.offset <= last]


async def _read(
    kafka: KafkaSettings, topic: str, partition: int, start: int, stop: int | None
) -> list[Any]:
    """Records from offset `start` up to `stop` (exclusive), or to the end offset seen at
    start when `stop` is None."""
    tp = TopicPartition(topic, partition)
    consumer = clients.consumer(
        kafka, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    await clients.start(consumer, kafka)
    records: list[Any] = []
    try:
        consumer.assign([tp])
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if stop is not None:
            end = min(end, stop)
        position = max(start, begin)
        if position >= end:
            return records
        consumer.seek(tp, position)
        while True:
            batches = await consumer.getmany(tp, timeout_ms=1000)
            records.extend(r for r in batches.get(tp, []) if r.offset < end)
            # Transaction markers occupy offsets without yielding records.
            if await consumer.position(tp) >= end:
                break
    finally:
        await consumer.stop()
    return records


async def read_missing(
    read: ReadRange, kafka: KafkaSettings, topic: str, partition: int, first: int, last: int
) -> list[Any]:
    """The records `first..last` of a partition that an agent's stream did not deliver, read
    with `read` (`read_range`, or a test's): retried while the broker is away, since the
    agent cannot go on without them, and logged when there are any."""
    records = await retry(
        lambda: read(kafka, topic, partition, first, last),
        READ_BACKOFF,
        what="read records missing from the stream",
        on_failure=lambda exc, retries, pause: log.error(
            "cannot read records missing from the stream, retrying",
            extra={"topic": topic, "partition": partition, "offset": first, "error": repr(exc)},
        ),
    )
    if records:
        log.warning(
            "records missing from the stream, read directly",
            extra={
                "topic": topic,
                "partition": partition,
                "first_offset": first,
                "last_offset": last,
                "records": len(records),
            },
        )
    return records
