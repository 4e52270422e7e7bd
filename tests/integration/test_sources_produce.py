"""Each source produces into the real broker through the one producer path, and what is read
back from `stock-quotes` is exactly what the source emitted (keys, contract values, order)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from stockstream.cli import main
from stockstream.contracts.quotes import Quote, QuoteValidator
from stockstream.kafka.topics import ensure_topics
from stockstream.producer.quote_producer import QuoteProducer
from stockstream.settings import QuoteSettings, Settings, load_settings
from stockstream.sources.finnhub.rest import FinnhubQuoteSource
from stockstream.sources.finnhub.websocket import FinnhubTradeSource
from stockstream.sources.simulator import Simulator
from tests.fakes.finnhub import FakeFinnhub

pytestmark = pytest.mark.integration
T0 = 1_767_623_400  # seconds


def env_for(bootstrap: str, tmp_path: Path) -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_QUOTES_TOPIC": f"src-quotes-{run}",
        "KAFKA_AGGREGATED_TOPIC": f"src-agg-{run}",
        "KAFKA_DLQ_TOPIC": f"src-dlq-{run}",
        "STOCKSTREAM_APP_ID": f"src-{run}",
        "PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        "LOG_FORMAT": "text",
    }


async def read_back(settings: Settings, count: int) -> list[tuple[bytes, dict[str, Any]]]:
    consumer = AIOKafkaConsumer(
        settings.kafka.quotes_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[tuple[bytes, dict[str, Any]]] = []
    try:
        async with asyncio.timeout(60):
            while len(out) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend((r.key, orjson.loads(r.value)) for r in records)
        extra = await consumer.getmany(timeout_ms=1000)
        out.extend((r.key, orjson.loads(r.value)) for rs in extra.values() for r in rs)
    finally:
        await consumer.stop()
    return out


def per_symbol(rows: list[tuple[bytes, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for key, value in rows:
        assert key == value["symbol"].encode()
        out.setdefault(value["symbol"], []).append(value)
    return out


def assert_valid(rows: list[tuple[bytes, dict[str, Any]]]) -> None:
    validator = QuoteValidator(QuoteSettings().symbol_pattern, 300_000)
    for key, value in rows:
        validator.validate(key, value, now_ms=value["market_timestamp"])


def test_simulate_via_cli(kafka_bootstrap: str, tmp_path: Path, monkeypatch: Any) -> None:
    env = env_for(kafka_bootstrap, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["produce", "--source", "simulate", "--fast", "--count", "3000", "--symbols", "25"]
    argv += ["--seed", "5", "--start-ms", str(T0 * 1000)]
    assert main(argv) == 0
    settings = load_settings(environ=env, dotenv_path=None)
    rows = asyncio.run(read_back(settings, 3000))
    expected = list(Simulator(symbols=25, seed=5, rate=50.0, start_ms=T0 * 1000).quotes(3000))
    assert len(rows) == 3000
    assert per_symbol(rows) == per_symbol([(q.symbol.encode(), q.to_dict()) for q in expected])
    assert_valid(rows)


def test_replay_via_cli(kafka_bootstrap: str, tmp_path: Path, monkeypatch: Any) -> None:
    env = env_for(kafka_bootstrap, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    quotes = list(Simulator(symbols=7, seed=9, rate=20.0, start_ms=T0 * 1000).quotes(700))
    path = tmp_path / "day.ndjson"
    path.write_text("".join(json.dumps(q.to_dict()) + "\n" for q in quotes))
    assert main(["produce", "--source", "replay", "--files", str(path), "--speed", "0"]) == 0
    settings = load_settings(environ=env, dotenv_path=None)
    rows = asyncio.run(read_back(settings, 700))
    want = [(q.symbol.encode(), {**q.to_dict(), "source": "replay"}) for q in quotes]
    assert per_symbol(rows) == per_symbol(want)


async def produce_from(source: Any, settings: Settings, count: int) -> list[Quote]:
    await ensure_topics(settings)
    sent: list[Quote] = []
    async with QuoteProducer(settings) as producer:
        async for quote in source.quotes():
            await producer.send(quote)
            sent.append(quote)
            if len(sent) == count:
                break
        await producer.flush()
    return sent


async def test_finnhub_rest_into_kafka(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = load_settings(environ=env_for(kafka_bootstrap, tmp_path), dotenv_path=None)
    async with FakeFinnhub(auto_advance=True) as fake:
        for i, symbol in enumerate(("AAPL", "MSFT", "NVDA")):
            fake.set_quote(symbol, 100.0 + i, t=T0)
        source = FinnhubQuoteSource(
            # ZZZZ is unknown to the fake (c=0, t=0): it must never reach the topic.
            fake.settings(symbols=("AAPL", "MSFT", "NVDA", "ZZZZ"), poll_interval_seconds=0.2)
        )
        sent = await produce_from(source, settings, 30)
    rows = await read_back(settings, 30)
    assert len(rows) == 30
    assert per_symbol(rows) == per_symbol(
        [(q.symbol.encode(), orjson.loads(q.to_json())) for q in sent]
    )
    assert {v["source"] for _, v in rows} == {"finnhub-quote"}
    assert "ZZZZ" not in per_symbol(rows)
    assert all(v["current_price"] > 0 for _, v in rows)
    assert_valid(rows)


async def test_finnhub_websocket_into_kafka(kafka_bootstrap: str, tmp_path: Path) -> None:
    settings = load_settings(environ=env_for(kafka_bootstrap, tmp_path), dotenv_path=None)
    trades = [
        {"s": s, "p": 100.0 + i, "t": T0 * 1000 + i, "v": 10 + i, "c": ["1"]}
        for i in range(40)
        for s in ("AAPL", "MSFT")
    ]
    async with FakeFinnhub() as fake:
        source = FinnhubTradeSource(fake.settings(symbols=("AAPL", "MSFT")))
        producing = asyncio.create_task(produce_from(source, settings, len(trades)))
        await fake.wait_subscribed(["AAPL", "MSFT"])
        for start in range(0, len(trades), 8):  # several trades per message
            await fake.push_trades(trades[start : start + 8])
        sent = await asyncio.wait_for(producing, 30)
    rows = await read_back(settings, len(trades))
    assert len(rows) == len(trades)
    assert per_symbol(rows) == per_symbol(
        [(q.symbol.encode(), orjson.loads(q.to_json())) for q in sent]
    )
    got = sorted(
        (v["symbol"], v["market_timestamp"], v["current_price"], v["volume"]) for _, v in rows
    )
    assert got == sorted((t["s"], t["t"], t["p"], float(t["v"])) for t in trades)
    assert {v["source"] for _, v in rows} == {"finnhub-trade"}
