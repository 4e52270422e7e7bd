"""Real worker processes, a deterministic data set and topic readers for integration tests."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stockstream.kafka.topics import ensure_topics
from stockstream.settings import load_settings
from tests.conftest import ROOT, free_port
from tests.reference import Record

T0 = 1_767_623_400_000  # 2026-01-05T14:30:00Z, a Monday market open: replayed, not live


@dataclass
class Stack:
    """Names and settings for one isolated run: own app id, topics and data dir."""

    bootstrap: str
    data_dir: Path
    partitions: int = 3
    idle_timeout: float = 3.0
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def quotes(self) -> str:
        return f"quotes-{self.run}"

    @property
    def aggregated(self) -> str:
        return f"aggregated-{self.run}"

    @property
    def dlq(self) -> str:
        return f"dlq-{self.run}"

    def env(self, web_port: int) -> dict[str, str]:
        return {
            **os.environ,
            "STOCKSTREAM_ENV": "dev",
            "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_QUOTES_TOPIC": self.quotes,
            "KAFKA_AGGREGATED_TOPIC": self.aggregated,
            "KAFKA_DLQ_TOPIC": self.dlq,
            "KAFKA_ANOMALIES_TOPIC": f"anomalies-{self.run}",
            "KAFKA_PARTITIONS": str(self.partitions),
            "STOCKSTREAM_APP_ID": f"it-{self.run}",
            "STOCKSTREAM_DATA_DIR": str(self.data_dir),
            "STOCKSTREAM_WEB_PORT": str(web_port),
            "AGG_IDLE_TIMEOUT_SECONDS": str(self.idle_timeout),
            "AGG_IDLE_CHECK_SECONDS": "0.5",
            "STOCKSTREAM_SESSION_TIMEOUT_SECONDS": "8",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            # Archive and warehouse are on by default: keep each run's output in its data dir.
            "ARCHIVE_LOCAL_DIR": str(self.data_dir / "archive"),
            "DUCKDB_PATH": str(self.data_dir / "warehouse.duckdb"),
            **self.extra_env,
        }


async def create_topics(stack: Stack) -> None:
    settings = load_settings(environ=stack.env(free_port()), dotenv_path=None)
    await ensure_topics(settings)


class Worker:
    """`faust -A stockstream worker` as a child process."""

    def __init__(self, stack: Stack, log_path: Path) -> None:
        self.stack = stack
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "stockstream", "worker", "-l", "info"],
            cwd=ROOT,
            env=stack.env(self.port),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, Any]:
        """(status, body): JSON bodies decoded, anything else as text."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, body, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        return status, json.loads(body) if "json" in ctype else body.decode()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _ = self.get("/ready/")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class Produced:
    records: list[Record]  # valid quotes with their partition/offset, in send order
    invalid: list[tuple[int, int]]  # (partition, offset) of records that must be dead-lettered


def dataset(
    symbols: int = 24,
    minutes: int = 40,
    per_minute: int = 12,
    seed: int = 7,
) -> list[tuple[bytes, bytes, bool]]:
    """(key, value, valid) in send order: per symbol a price walk over `minutes`, shuffled
    locally (out of order within grace), a few events far behind (late) and bad records."""
    rng = random.Random(seed)
    names = [f"S{i:03d}" for i in range(symbols)]
    events: list[tuple[int, str, float, float | None]] = []
    for name in names:
        price = rng.uniform(10, 500)
        for m in range(minutes):
            for _ in range(per_minute):
                price = round(max(0.5, price * (1 + rng.gauss(0, 0.002))), 4)
                ts = T0 + m * 60_000 + rng.randrange(60_000)
                volume = None if rng.random() < 0.1 else float(rng.randrange(1, 500))
                events.append((ts, name, price, volume))
    events.sort()
    # Local disorder: swap neighbours up to ~3 s apart, which the 5 s grace absorbs.
    for i in range(0, len(events) - 1, 3):
        if events[i + 1][0] - events[i][0] < 3_000:
            events[i], events[i + 1] = events[i + 1], events[i]
    out: list[tuple[bytes, bytes, bool]] = []
    for i, (ts, name, price, volume) in enumerate(events):
        body = {
            "symbol": name,
            "current_price": price,
            "market_timestamp": ts,
            "source": "replay",
            "volume": volume,
        }
        out.append((name.encode(), json.dumps(body).encode(), True))
        if i % 997 == 500:  # late: two minutes behind the watermark
            late = {**body, "market_timestamp": ts - 120_000}
            out.append((name.encode(), json.dumps(late).encode(), True))
        if i % 1499 == 100:
            out.append((name.encode(), b"{not json", False))
        if i % 1499 == 700:
            out.append((name.encode(), json.dumps({**body, "current_price": -1}).encode(), False))
    return out


async def produce(bootstrap: str, topic: str, rows: list[tuple[bytes, bytes, bool]]) -> Produced:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=20
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v, _ in rows]
        metas = [await f for f in futures]
    finally:
        await producer.stop()
    records: list[Record] = []
    invalid: list[tuple[int, int]] = []
    for (_, value, valid), meta in zip(rows, metas, strict=True):
        if not valid:
            invalid.append((meta.partition, meta.offset))
            continue
        body = json.loads(value)
        records.append(
            Record(
                meta.partition,
                meta.offset,
                body["symbol"],
                body["current_price"],
                body["market_timestamp"],
                body["volume"],
            )
        )
    return Produced(records, invalid)


async def read_all(
    bootstrap: str,
    topic: str,
    until: int | None = None,
    wait_s: float = 120.0,
    settle: float = 3.0,
) -> list[Any]:
    """Every record of `topic` (read_committed): waits until `until` records arrived (or the
    timeout), then keeps reading for `settle` seconds to catch duplicates."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + wait_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp_records in batches.values():
                for r in tp_records:
                    out.append((r.partition, r.offset, r.key, json.loads(r.value), r.timestamp))
            if until is not None and len(out) >= until and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        await consumer.stop()
    return out


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    return sum((await partition_end_offsets(bootstrap, topic, partitions)).values())


async def partition_end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The consumer group's committed offset per partition of `topic`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
