"""Waiting out a failing sink without leaving the consumer group (archive and warehouse)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition


async def sleep_polling_paused(
    consumer: AIOKafkaConsumer,
    seconds: float,
    resumable: Callable[[], Iterable[TopicPartition]],
) -> None:
    """Sleep `seconds` with every partition paused but still polling: a consumer that stops
    polling is evicted from its group after max.poll.interval. Afterwards the partitions that
    `resumable()` names (evaluated then: the assignment may have changed) are resumed."""
    consumer.pause(*consumer.assignment())
    try:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            stray = await consumer.getmany(timeout_ms=max(1, int(left * 1000)))
            for tp, records in stray.items():  # cannot happen while paused; never drop
                if records:
                    consumer.seek(tp, records[0].offset)
    finally:
        ready = [tp for tp in resumable() if tp in consumer.assignment()]
        if ready:
            consumer.resume(*ready)
