"""The anomaly agent end to end, against a real broker and the real worker: quotes become
windows, windows become anomalies; exactly the anomalies an independent recomputation finds
over the emitted windows appear in the anomalies topic, once each, also across a SIGKILL of
the worker right after it emitted one; bad window records are dead-lettered."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.integration.harness import T0, Stack, Worker, create_topics, produce, read_all
from tests.unit.test_anomaly_reference import RefWindow, expected_anomalies

pytestmark = pytest.mark.integration

MIN = 60_000
MINUTES = 30
SYMBOLS = [f"N{i}" for i in range(6)] + ["JUMP"]
JUMP_MINUTE, SPIKE_MINUTE = 14, 20
RULES = {"z_threshold": 4.0, "history_windows": 8, "min_history": 5, "cooldown_ms": 180_000}


def quotes(minutes: range, seed: int = 3) -> list[tuple[bytes, bytes, bool]]:
    """Six quotes per symbol and minute, in event-time order; JUMP's price jumps by 30% in
    minute 14 and its volume is 100 times the usual in minutes 20 and 22 (the second within
    the 3-minute cool-down)."""
    rng = random.Random(seed)
    prices = {s: 100.0 + 10 * i for i, s in enumerate(SYMBOLS)}
    events: list[tuple[int, str, float, float]] = []
    for minute in range(MINUTES):
        for symbol in SYMBOLS:
            for i in range(6):
                price = prices[symbol] * (1 + rng.gauss(0, 0.001))
                if symbol == "JUMP" and minute == JUMP_MINUTE and i == 0:
                    price *= 1.3
                prices[symbol] = price = round(price, 4)
                volume = float(rng.randrange(90, 111))
                if symbol == "JUMP" and minute in (SPIKE_MINUTE, SPIKE_MINUTE + 2):
                    volume *= 100
                if minute in minutes:
                    events.append((T0 + minute * MIN + i * 9_000 + 500, symbol, price, volume))
    events.sort()
    return [
        (
            s.encode(),
            json.dumps(
                {
                    "symbol": s,
                    "current_price": p,
                    "market_timestamp": ts,
                    "source": "replay",
                    "volume": v,
                }
            ).encode(),
            True,
        )
        for ts, s, p, v in events
    ]


async def produce_hostile_windows(bootstrap: str, topic: str) -> None:
    """Records of the windows topic the aggregation could never write (far from the data's
    windows, so the aggregation's own read-back cannot take them for windows of its own)."""
    bad_window = {
        "symbol": "N0",
        "window_start": "2025-12-01T00:00:00Z",
        "window_end": "2025-12-01T00:01:00Z",
        "window_start_ms": 1_764_547_200_000,
        "close": -1.0,
    }
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"{not json", key=b"N0")
        await producer.send_and_wait(topic, json.dumps(bad_window).encode(), key=b"N0")
    finally:
        await producer.stop()


async def read_decoded(bootstrap: str, topic: str) -> list[Any]:
    """Like harness.read_all (what has arrived by now), with records that are not JSON
    (the hostile ones) as their bytes."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    rows: list[Any] = []
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            if not batches:
                return rows
            for records in batches.values():
                for r in records:
                    try:
                        value = json.loads(r.value)
                    except ValueError:
                        value = r.value
                    rows.append((r.partition, r.offset, r.key, value, r.timestamp))
    finally:
        await consumer.stop()


async def kill_when_logged(worker: Worker, needle: str) -> None:
    """SIGKILL `worker` as soon as its log has `needle` (polled every few milliseconds)."""
    deadline = time.monotonic() + 180
    while needle not in worker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, worker.tail()
        assert worker.proc.poll() is None, worker.tail()
        await asyncio.sleep(0.005)
    worker.proc.kill()


async def wait_for(bootstrap: str, topic: str, predicate: Any, worker: Worker) -> list[Any]:
    deadline = time.monotonic() + 180
    while True:
        rows = await read_decoded(bootstrap, topic)
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, worker.tail()
        assert worker.proc.poll() is None, worker.tail()
        await asyncio.sleep(0.1)


async def test_anomalies_exactly_once_across_a_sigkill(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    anomalies_topic = f"anomalies-{stack.run}"
    stack.extra_env = {
        "KAFKA_ANOMALIES_TOPIC": anomalies_topic,
        "ANOMALY_Z_THRESHOLD": str(RULES["z_threshold"]),
        "ANOMALY_HISTORY_WINDOWS": str(RULES["history_windows"]),
        "ANOMALY_MIN_HISTORY": str(RULES["min_history"]),
        "ANOMALY_COOLDOWN_SECONDS": str(RULES["cooldown_ms"] / 1000),
        "ARCHIVE_ENABLED": "false",
        "WAREHOUSE_ENABLED": "false",
    }
    await create_topics(stack)
    await produce_hostile_windows(kafka_bootstrap, stack.aggregated)
    await produce(kafka_bootstrap, stack.quotes, quotes(range(0, SPIKE_MINUTE - 2)))

    def has_jump(rows: list[Any]) -> bool:
        return any(v["symbol"] == "JUMP" and v["kind"] == "return" for *_, v, _ in rows)

    # The first worker's producer lingers, so the table writes that follow an emitted anomaly
    # stay in its buffer for a while; killed then, the restart finds the anomaly in the output
    # without the fold of its window, judges the window again and must not emit it twice.
    stack.extra_env["STOCKSTREAM_PRODUCER_LINGER_SECONDS"] = "0.3"
    first = Worker(stack, tmp_path / "worker-1.log")
    try:
        first.wait_ready()
        await kill_when_logged(first, '"message":"anomaly emitted","symbol":"JUMP"')
    finally:
        first.kill()
    del stack.extra_env["STOCKSTREAM_PRODUCER_LINGER_SECONDS"]
    at_kill = await read_all(kafka_bootstrap, anomalies_topic, wait_s=3.0, settle=0)
    assert has_jump(at_kill)
    await produce(kafka_bootstrap, stack.quotes, quotes(range(SPIKE_MINUTE - 2, MINUTES)))
    second = Worker(stack, tmp_path / "worker-2.log")
    try:
        second.wait_ready()
        windows = await wait_for(
            kafka_bootstrap,
            stack.aggregated,
            lambda rows: len(rows) >= 2 + len(SYMBOLS) * MINUTES,
            second,
        )
        real = [(p, v) for p, _, _, v, _ in windows if isinstance(v, dict) and "count" in v]
        assert len(real) == len(SYMBOLS) * MINUTES
        expected = expected_anomalies([RefWindow.of(v) for _, v in real], **RULES)  # type: ignore[arg-type]
        anomalies = await read_all(
            kafka_bootstrap, anomalies_topic, until=len(expected), settle=5.0
        )
        dlq = await read_all(kafka_bootstrap, stack.dlq, until=2, wait_s=30)
        status, metrics = second.get("/metrics/")
    finally:
        second.stop()

    assert 0 < len(at_kill) < len(expected), "the kill must happen mid-run"
    assert ("JUMP", T0 + JUMP_MINUTE * MIN, "return") in expected
    assert ("JUMP", T0 + SPIKE_MINUTE * MIN, "volume") in expected
    assert ("JUMP", T0 + (SPIKE_MINUTE + 2) * MIN, "volume") not in expected  # cool-down
    identities = Counter(
        (v["symbol"], v["window_start_ms"], v["kind"]) for _, _, _, v, _ in anomalies
    )
    assert [i for i, n in identities.items() if n > 1] == [], "anomalies emitted twice"
    assert set(identities) == set(expected)
    partition_of = {v["symbol"]: p for p, v in real}
    for partition, _, key, value, _ in anomalies:
        ref = expected[(value["symbol"], value["window_start_ms"], value["kind"])]
        assert key == value["symbol"].encode() and partition == partition_of[value["symbol"]]
        assert value["history"] == ref["history"]
        assert math.isclose(value["z"], ref["z"], rel_tol=1e-9)
        assert math.isclose(value["value"], ref["value"], rel_tol=1e-12)
        assert value["threshold"] == RULES["z_threshold"]
    hostile = {(v["partition"], v["offset"]): v["reason"] for _, _, _, v, _ in dlq}
    assert sorted(hostile.values()) == ["invalid", "malformed"]
    assert all(v["topic"] == stack.aggregated for _, _, _, v, _ in dlq)
    assert status == 200 and "stockstream_anomalies_total{" in metrics
