"""Every Kafka client of the project, built from one connection config (`KafkaSettings`).

The Faust app, the producer, the archive and warehouse consumers, the restart read-back and
the CLI tools all connect through these functions, so how to reach the cluster (servers, and
whatever else a cluster asks of its clients) is decided in one place.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from stockstream.settings import KafkaSettings


def bootstrap_servers(kafka: KafkaSettings) -> list[str]:
    return [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()]


def connection(kafka: KafkaSettings) -> dict[str, Any]:
    """The keyword arguments every aiokafka client needs to reach the cluster."""
    return {"bootstrap_servers": bootstrap_servers(kafka)}


def faust_brokers(kafka: KafkaSettings) -> list[str]:
    """The same servers as Faust broker URLs."""
    return [f"kafka://{server}" for server in bootstrap_servers(kafka)]


def consumer(kafka: KafkaSettings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer (not started). `options` are aiokafka's, e.g. `group_id=None` to read
    without a group."""
    return AIOKafkaConsumer(*topics, **connection(kafka), **options)


def producer(kafka: KafkaSettings, **options: Any) -> AIOKafkaProducer:
    """A producer (not started) with the caller's delivery options."""
    return AIOKafkaProducer(**connection(kafka), **options)


def admin(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection(kafka))
