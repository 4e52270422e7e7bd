"""`stockstream dlq redrive` against a real broker: a dead letter present twice (the DLQ is
at-least-once) is re-produced once, in this run and in any later one; a dead letter naming a
topic that is not the project's is refused; a cut original is not re-produced."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stockstream.contracts.dead_letters import Reason, dead_letter
from stockstream.redrive import redrive_dead_letters
from stockstream.settings import load_settings
from tests.conftest import free_port
from tests.integration.harness import T0, Stack, create_topics, read_all

pytestmark = pytest.mark.integration


def letter(topic: str, offset: int, symbol: str = "AAPL", **cut: int) -> bytes:
    original = orjson.dumps(
        {"symbol": symbol, "current_price": 10.0, "market_timestamp": T0, "source": "replay"}
    )
    return orjson.dumps(
        dead_letter(
            key=symbol.encode(),
            value=original,
            topic=topic,
            partition=0,
            offset=offset,
            reason=Reason.INVALID,
            error="fixed since",
            failed_at_ms=T0,
            **cut,
        )
    )


async def test_each_dead_letter_is_re_driven_once_and_only_into_project_topics(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    await create_topics(stack)
    settings = load_settings(environ=stack.env(free_port()), dotenv_path=None)
    changelog = f"it-{stack.run}-window-state-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(changelog, 3, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for value in (
            letter(stack.quotes, 5, "AAPL"),
            letter(stack.quotes, 5, "AAPL"),  # the same dead letter again, after a crash
            letter(changelog, 7, "EVIL"),  # not a topic the re-drive writes to
            letter(stack.quotes, 9, "CUT", max_value_bytes=10),  # a cut original
        ):
            await producer.send_and_wait(stack.dlq, value=value, partition=0)
        first = await redrive_dead_letters(settings, ["invalid"])
        # Later: the duplicate shows up once more, beside a new dead letter.
        for value in (letter(stack.quotes, 5, "AAPL"), letter(stack.quotes, 6, "MSFT")):
            await producer.send_and_wait(stack.dlq, value=value, partition=0)
        second = await redrive_dead_letters(settings, ["invalid"])
        third = await redrive_dead_letters(settings, ["invalid"])
    finally:
        await producer.stop()
    assert (first, second, third) == (1, 1, 0)
    quotes = await read_all(kafka_bootstrap, stack.quotes, until=2, wait_s=20)
    assert sorted(value["symbol"] for _, _, _, value, _ in quotes) == ["AAPL", "MSFT"]
    assert await read_all(kafka_bootstrap, changelog, wait_s=3, settle=0) == []
