"""Reading one partition from an offset to its current end, without a consumer group."""

from __future__ import annotations

import logging

from aiokafka import TopicPartition

from stockstream.kafka import clients
from stockstream.settings import KafkaSettings

log = logging.getLogger(__name__)


async def read_after(
    kafka: KafkaSettings, topic: str, partition: int, after_offset: int
) -> tuple[list[tuple[int, bytes | None]], int]:
    """(offset, value) of every record of `topic`/`partition` after `after_offset` up to the end
    offset seen at start, and the highest offset read (`after_offset` when there was none)."""
    tp = TopicPartition(topic, partition)
    consumer = clients.consumer(
        kafka, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    records: list[tuple[int, bytes | None]] = []
    last = after_offset
    try:
        consumer.assign([tp])
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        start = max(after_offset + 1, begin)
        consumer.seek(tp, start)
        while start < end and last < end - 1:
            batches = await consumer.getmany(tp, timeout_ms=1000)
            for record in batches.get(tp, []):
                last = record.offset
                records.append((record.offset, record.value))
            # Transaction markers occupy offsets without yielding records.
            if await consumer.position(tp) >= end:
                break
    finally:
        await consumer.stop()
    log.info(
        "read back partition",
        extra={"topic": topic, "partition": partition, "offset": last, "records": len(records)},
    )
    return records, last
