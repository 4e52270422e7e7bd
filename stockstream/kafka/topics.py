"""The Kafka topics stockstream owns, and their creation.

The aggregation is per partition, so `stock-quotes`, its clock topic and
`stock-quotes-aggregated` must have the same partition count: a closed window of source
partition p is written to output partition p, which is how a restarted worker finds what it
already emitted. `ensure_topics` creates missing topics and refuses mismatched ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stockstream.errors import StockstreamError
from stockstream.kafka import clients
from stockstream.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)


class TopicLayoutError(StockstreamError):
    """The topics exist with a layout the aggregation cannot work with."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
    copartitioned: bool


def clock_topic_name(settings: Settings) -> str:
    """Internal topic that carries idle ticks into the aggregation agent's partitions."""
    return f"{settings.worker.app_id}-aggregation-clock"


def redriven_topic_name(settings: Settings) -> str:
    """Compacted index of the dead letters `stockstream dlq redrive` has re-produced."""
    return f"{settings.worker.app_id}-dlq-redriven"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    k = settings.kafka
    return [
        TopicSpec(k.quotes_topic, k.partitions, {}, copartitioned=True),
        TopicSpec(k.aggregated_topic, k.partitions, {}, copartitioned=True),
        TopicSpec(k.dlq_topic, k.partitions, {}, copartitioned=False),
        # Anomalies of input partition p go to output partition p (agents/anomaly/): checked
        # only while the detector runs.
        TopicSpec(k.anomalies_topic, k.partitions, {}, copartitioned=settings.anomaly.enabled),
        # Ticks are only meaningful for a few seconds; a day keeps them for debugging.
        TopicSpec(clock_topic_name(settings), k.partitions, {"retention.ms": "86400000"}, True),
        # One key per re-driven dead letter, kept forever (compacted): small, read whole.
        TopicSpec(redriven_topic_name(settings), 1, {"cleanup.policy": "compact"}, False),
    ]


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    # Right after creation the metadata may not list a topic's partitions yet.
    counts: dict[str, int] = {}
    for _ in range(50):
        described = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        if all(counts.get(name, 0) > 0 for name in names):
            break
        await asyncio.sleep(0.2)
    return counts


async def ensure_topics(settings: Settings) -> None:
    specs = topic_specs(settings)
    admin = clients.admin(settings.kafka)
    await clients.start(admin, settings.kafka)  # a refused login raises KafkaAccessError
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            # Another process may create one between list and create: that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            s.name,
                            num_partitions=s.partitions,
                            replication_factor=settings.kafka.replication_factor,
                            topic_configs=s.config,
                        )
                        for s in missing
                    ]
                )
            for s in missing:
                log.info("created topic", extra={"topic": s.name, "partitions": s.partitions})
        counts = await _partition_counts(admin, [s.name for s in specs])
        for spec in specs:
            actual = counts.get(spec.name, 0)
            if spec.copartitioned and actual != spec.partitions:
                raise TopicLayoutError(
                    f"topic {spec.name!r} has {actual} partitions, expected {spec.partitions}"
                    " (KAFKA_PARTITIONS): the aggregation and the anomaly detector need their"
                    " source, clock and output topics co-partitioned"
                )
    finally:
        await admin.close()


async def partitions_of(kafka: KafkaSettings, topic: str) -> list[int]:
    """The partition numbers of `topic` (empty when it does not exist)."""
    admin = clients.admin(kafka)
    await clients.start(admin, kafka)
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(
        p["partition"]
        for d in described
        if d["topic"] == topic and not d.get("error_code")
        for p in d["partitions"]
    )
