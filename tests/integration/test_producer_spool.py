"""The quote producer against a real broker that goes away and comes back.

The module starts its own broker (scripts/kafka.sh on KAFKA_SPOOL_TEST_PORT, default 39092,
controller port +1000) rather than the session's, because it stops and restarts it. Timeouts
are small (delivery 3 s, request 2 s, spool retry 1 s) so an outage is noticed quickly.

Every quote carries its index in `market_timestamp` (T0 + i), so reading the topic back shows
whether each one arrived exactly once and whether each symbol's quotes kept their order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stockstream.contracts.quotes import Quote
from stockstream.kafka.topics import ensure_topics
from stockstream.metrics import REGISTRY
from stockstream.producer.quote_producer import QuoteProducer
from stockstream.producer.spool import Spool
from stockstream.settings import Settings, load_settings
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

T0 = 1_767_623_400_000
SYMBOLS = [f"SP{i:02d}" for i in range(12)]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"


class Broker:
    """A broker of our own that the tests may stop and start."""

    def __init__(self, port: int) -> None:
        self.bootstrap = f"127.0.0.1:{port}"
        self._env = {
            **os.environ,
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(port + 1000),
        }

    @property
    def pid(self) -> int:
        kafka_dir = Path(self._env.get("KAFKA_DIR") or ROOT / ".local" / "kafka")
        return int((kafka_dir / f"broker-{self._env['KAFKA_PORT']}.pid").read_text().strip())

    def _run(self, command: str) -> None:
        subprocess.run([str(KAFKA_SH), command], check=True, env=self._env, timeout=300)

    def start(self) -> None:
        self._run("start")  # idempotent

    def stop(self) -> None:
        self._run("stop")

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = Broker(int(os.environ.get("KAFKA_SPOOL_TEST_PORT", "39092")))
    b.start()
    try:
        yield b
    finally:
        b.stop()


def make_settings(bootstrap: str, spool_dir: Path) -> Settings:
    run = uuid.uuid4().hex[:8]
    return load_settings(
        environ={
            "STOCKSTREAM_ENV": "dev",
            "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_QUOTES_TOPIC": f"spool-quotes-{run}",
            "KAFKA_AGGREGATED_TOPIC": f"spool-aggregated-{run}",
            "KAFKA_DLQ_TOPIC": f"spool-dlq-{run}",
            "STOCKSTREAM_APP_ID": f"spool-{run}",
            "KAFKA_PARTITIONS": "3",
            "PRODUCER_LINGER_MS": "5",
            "PRODUCER_DELIVERY_TIMEOUT_SECONDS": "3",
            "PRODUCER_REQUEST_TIMEOUT_MS": "2000",
            "PRODUCER_SPOOL_RETRY_SECONDS": "1",
            "PRODUCER_SPOOL_DIR": str(spool_dir),
        },
        dotenv_path=None,
    )


async def read_topic(
    bootstrap: str, topic: str, until: int, wait_s: float = 60.0, settle: float = 3.0
) -> list[tuple[int, int, bytes | None, Any]]:
    """(partition, offset, key, decoded value) of every record; once `until` records are in,
    keeps reading `settle` seconds more so late duplicates would show."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[tuple[int, int, bytes | None, Any]] = []
    try:
        deadline = time.monotonic() + wait_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                out.extend((r.partition, r.offset, r.key, orjson.loads(r.value)) for r in records)
            if len(out) >= until and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        await consumer.stop()
    return out


def quote(i: int) -> Quote:
    return Quote(
        symbol=SYMBOLS[i % len(SYMBOLS)],
        current_price=round(100 + (i % 97) * 0.25, 2),
        market_timestamp=T0 + i,
        source="simulator",
        volume=float(i % 500),
    )


def check_exactly_once_in_order(records: list[Any], expected: int) -> None:
    """All quotes 0..expected-1 once each; per symbol in increasing index by offset."""
    indexes = [value["market_timestamp"] - T0 for _, _, _, value in records]
    counts = Counter(indexes)
    duplicates = sorted(i for i, c in counts.items() if c > 1)
    missing = sorted(set(range(expected)) - set(counts))
    assert not duplicates, f"{len(duplicates)} duplicated, e.g. {duplicates[:10]}"
    assert not missing, f"{len(missing)} missing, e.g. {missing[:10]}"
    assert len(records) == expected
    per_symbol: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for partition, offset, key, value in records:
        assert key == value["symbol"].encode()
        assert value == quote(value["market_timestamp"] - T0).to_dict()
        per_symbol[value["symbol"]].append((partition, offset, value["market_timestamp"] - T0))
        partitions[value["symbol"]].add(partition)
    for symbol, rows in per_symbol.items():
        assert len(partitions[symbol]) == 1, f"{symbol} spread over partitions"
        in_log_order = [i for _, _, i in sorted(rows)]
        assert in_log_order == sorted(in_log_order), f"{symbol} out of order"


def metric(name: str, topic: str) -> float:
    value = REGISTRY.get_sample_value(name, {"topic": topic})
    return 0.0 if value is None else value


async def test_normal_path_keys_values_and_order(broker: Broker, tmp_path: Path) -> None:
    broker.start()
    settings = make_settings(broker.bootstrap, tmp_path / "spool")
    topic = settings.kafka.quotes_topic
    await ensure_topics(settings)
    n = 5000
    async with QuoteProducer(settings) as producer:
        assert not producer.spooling
        for i in range(n):
            await producer.send(quote(i))
        await producer.flush()
        assert (producer.sent, producer.failed, producer.spooled) == (n, 0, 0)
    records = await read_topic(broker.bootstrap, topic, until=n, settle=2)
    check_exactly_once_in_order(records, n)
    assert metric("stockstream_producer_sent_total", topic) == n
    assert metric("stockstream_producer_delivery_seconds_count", topic) == n
    assert metric("stockstream_producer_spool_pending", topic) == 0
    assert list((tmp_path / "spool" / topic).glob("seg-*")) == []


async def test_broker_down_then_up_spools_and_drains_exactly_once(
    broker: Broker, tmp_path: Path
) -> None:
    broker.start()
    settings = make_settings(broker.bootstrap, tmp_path / "spool")
    topic = settings.kafka.quotes_topic
    await ensure_topics(settings)
    sent = 0
    stop = asyncio.Event()

    async def feed(producer: QuoteProducer) -> None:
        nonlocal sent
        while not stop.is_set():
            for _ in range(10):
                await producer.send(quote(sent))
                sent += 1
            await asyncio.sleep(0.01)  # ~1000 quotes/s

    async with QuoteProducer(settings) as producer:
        feeding = asyncio.create_task(feed(producer))
        await asyncio.sleep(2)
        assert not producer.spooling and producer.sent > 0
        await broker.astop()  # mid-stream; the feed keeps going
        await asyncio.sleep(5)  # past the 3 s delivery timeout
        assert producer.spooling
        spooled_while_down = producer.spooled
        assert spooled_while_down > 0
        await broker.astart()
        assert await producer.wait_drained(60), "spool not drained after the broker came back"
        await asyncio.sleep(1)  # some direct sends again
        stop.set()
        await feeding
        await producer.flush()
        assert not producer.spooling
        assert producer.failed > 0
        assert producer.sent == sent, (producer.sent, sent)
        reconciled = producer.reconciled
    records = await read_topic(broker.bootstrap, topic, until=sent)
    check_exactly_once_in_order(records, sent)
    print(f"sent {sent}, spooled {spooled_while_down}+, found already delivered {reconciled}")
    assert metric("stockstream_producer_spool_pending", topic) == 0
    assert metric("stockstream_producer_spooling", topic) == 0


async def test_broker_paused_past_the_timeout_late_appends_are_not_duplicated(
    broker: Broker, tmp_path: Path
) -> None:
    """The realistic duplicate case: the broker is frozen (SIGSTOP) with produce requests
    read into its socket buffers; the delivery times out, the session is given up and its
    records spooled; on SIGCONT the broker still appends those requests. Re-sending them
    blindly duplicates them (tried: ~20-40 duplicates per run without the reconciliation);
    the producer finds them in the topic and sends only the rest."""
    broker.start()
    settings = make_settings(broker.bootstrap, tmp_path / "spool")
    topic = settings.kafka.quotes_topic
    await ensure_topics(settings)
    sent = 0
    stop = asyncio.Event()

    async def feed(producer: QuoteProducer) -> None:
        nonlocal sent
        while not stop.is_set():
            for _ in range(20):
                await producer.send(quote(sent))
                sent += 1
            await asyncio.sleep(0.005)

    pid = broker.pid
    async with QuoteProducer(settings) as producer:
        feeding = asyncio.create_task(feed(producer))
        await asyncio.sleep(2)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5)  # past the 3 s delivery timeout
            assert producer.spooling
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await producer.wait_drained(60), "spool not drained after the broker resumed"
        await asyncio.sleep(0.5)
        stop.set()
        await feeding
        await producer.flush()
        assert producer.failed > 0
        assert producer.sent == sent
        reconciled = producer.reconciled
    records = await read_topic(broker.bootstrap, topic, until=sent)
    check_exactly_once_in_order(records, sent)
    print(f"sent {sent}, found already delivered (not re-sent) {reconciled}")


async def test_spool_left_by_a_closed_producer_is_drained_on_next_start(
    broker: Broker, tmp_path: Path
) -> None:
    broker.start()
    settings = make_settings(broker.bootstrap, tmp_path / "spool")
    topic = settings.kafka.quotes_topic
    spool_dir = tmp_path / "spool" / topic
    await ensure_topics(settings)

    # 1. Some quotes delivered, then the broker goes away with quotes in flight; close()
    #    waits for the delivery timeout and spools them.
    async with QuoteProducer(settings) as first:
        for i in range(1000):
            await first.send(quote(i))
        await first.flush()
        assert first.sent == 1000
        await broker.astop()
        for i in range(1000, 2000):
            await first.send(quote(i))
    assert first.sent == 1000
    assert first.spool_pending == 1000
    assert list(spool_dir.glob("seg-*"))

    # 2. A producer started while the broker is still down: it starts anyway and queues
    #    behind the spool.
    async with QuoteProducer(settings) as second:
        assert second.spooling
        assert second.spool_pending == 1000
        for i in range(2000, 2500):
            await second.send(quote(i))
        await second.flush()
        assert second.sent == 0 and second.spooled == 500
    assert second.spool_pending == 1500

    # 3. Broker back; the next producer drains the spool first, then sends directly.
    await broker.astart()
    async with QuoteProducer(settings) as third:
        assert third.spool_pending == 1500
        for i in range(2500, 3000):  # queued behind the spool until it is drained
            await third.send(quote(i))
        assert await third.wait_drained(60), "spool not drained on start"
        for i in range(3000, 3200):
            await third.send(quote(i))
        await third.flush()
        assert (third.sent, third.spooled) == (2200, 500)
        assert third.spool_pending == 0
    assert list(spool_dir.glob("seg-*")) == []
    records = await read_topic(broker.bootstrap, topic, until=3200)
    check_exactly_once_in_order(records, 3200)


async def test_in_doubt_records_already_in_the_topic_are_not_sent_again(
    broker: Broker, tmp_path: Path
) -> None:
    """The duplicate case itself, made deterministic: a previous run handed quotes 0..14 to
    a session that died unacknowledged, but the broker had appended 0..9 (and another
    producer wrote to the same partitions after them); 15..19 were queued behind. The next
    producer must find 0..9 in the topic and send only 10..19."""
    broker.start()
    settings = make_settings(broker.bootstrap, tmp_path / "spool")
    topic = settings.kafka.quotes_topic
    await ensure_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        floors = {str(tp.partition): o for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()
    plain = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await plain.start()
    try:
        for i in range(10):  # landed, but the spool never learnt it
            await plain.send_and_wait(topic, quote(i).to_json(), key=quote(i).symbol.encode())
        for i in range(12):  # someone else's quotes in between
            other = dataclasses.replace(quote(i), source="replay")
            await plain.send_and_wait(topic, other.to_json(), key=other.symbol.encode())
    finally:
        await plain.stop()
    with Spool(tmp_path / "spool" / topic) as spool:
        for i in range(20):
            spool.append(quote(i).symbol.encode(), quote(i).to_json(), None)
        spool.save({"sent_upto": 15, "floors": floors, "partitions": 3})

    async with QuoteProducer(settings) as producer:
        assert await producer.wait_drained(60)
        await producer.flush()
        assert producer.reconciled == 10
        assert producer.sent == 20  # 10 found + 10 sent
    records = await read_topic(broker.bootstrap, topic, until=32)
    ours = [r for r in records if r[3]["source"] == "simulator"]
    check_exactly_once_in_order(ours, 20)
    assert len(records) == 32
    assert metric("stockstream_producer_reconciled_total", topic) == 10
