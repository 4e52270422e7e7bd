"""What a source partition already emitted, read back from its output partition.

Emitting a window and recording the close in the changelog cannot be one atomic step without
Kafka transactions, so after a crash a window may be closed again. Output partition p only
receives windows of source partition p, oldest first per symbol, so the newest window start
per symbol found after the last checkpointed output offset tells exactly which re-closed
windows are already out there.
"""

from __future__ import annotations

import logging

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

log = logging.getLogger(__name__)


async def emitted_since(
    bootstrap_servers: list[str], topic: str, partition: int, after_offset: int
) -> tuple[dict[str, int], int]:
    """Newest window start per symbol in `topic`/`partition` after `after_offset`, and the
    highest offset read (or `after_offset` if there was nothing)."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    newest: dict[str, int] = {}
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
                if record.value is None:
                    continue
                try:
                    data = orjson.loads(record.value)
                    symbol, start_ms = str(data["symbol"]), int(data["window_start_ms"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    # Not ours (written by hand?): it cannot be a window we emitted.
                    log.warning(
                        "skipping a non-window record in the output topic",
                        extra={"topic": topic, "partition": partition, "offset": record.offset},
                    )
                    continue
                if start_ms > newest.get(symbol, -1):
                    newest[symbol] = start_ms
            # Transaction markers occupy offsets without yielding records.
            if await consumer.position(tp) >= end:
                break
    finally:
        await consumer.stop()
    log.info(
        "recovered emitted windows",
        extra={"topic": topic, "partition": partition, "offset": last, "symbols": len(newest)},
    )
    return newest, last
