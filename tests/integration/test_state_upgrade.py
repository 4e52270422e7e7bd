"""Upgrading a running deployment: window state written by stockstream 0.1 (positional lists,
no version) is restored by the current worker, so the open windows it holds are not lost.

The "old worker" is simulated exactly: it consumed a prefix of every partition, left its open
windows and partition clocks in the changelog in the 0.1 format and committed its consumer
offsets after the prefix. The new worker starts after the prefix, so the prefix's quotes reach
the output only through the restored state: every window must still equal the independent
recomputation over all quotes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stockstream.kafka import clients
from stockstream.settings import load_settings
from tests.conftest import free_port
from tests.integration.harness import Stack, Worker, create_topics, dataset, produce, read_all
from tests.integration.test_aggregation import check_output
from tests.reference import Record, expected_windows

pytestmark = pytest.mark.integration

WINDOW_MS = 60_000


def v0_window(records: list[Record]) -> list[object]:
    """A window as stockstream 0.1's `WindowAggregate.to_state()` wrote it."""
    start = records[0].ts // WINDOW_MS * WINDOW_MS
    first = min(records, key=lambda r: (r.ts, r.offset))
    last = max(records, key=lambda r: (r.ts, r.offset))
    with_volume = [r for r in records if r.volume is not None]
    volume = sum(r.volume for r in with_volume) if with_volume else None  # type: ignore[misc]
    return [
        records[0].symbol,
        start,
        WINDOW_MS,
        len(records),
        sum(r.price for r in records),
        min(r.price for r in records),
        max(r.price for r in records),
        first.price,
        first.ts,
        last.price,
        last.ts,
        volume,
        sum(r.price * r.volume for r in with_volume),  # type: ignore[operator]
        min(r.ts for r in records),
        max(r.ts for r in records),
        max(r.offset for r in records),
    ]


async def test_state_written_by_0_1_is_restored_and_its_windows_emitted(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # The idle rule measures processing wall clock, so a slow start (coverage, a loaded CI
    # machine) could flush the restored windows before the quotes queued behind them are
    # processed: a longer idle timeout keeps this test about the upgrade alone.
    stack = Stack(kafka_bootstrap, tmp_path / "data", idle_timeout=10.0)
    await create_topics(stack)
    rows = dataset(symbols=24, minutes=6)
    # The prefix the old worker handled: the first 80 records, all valid and all inside the
    # first minute, so it closed nothing and dead-lettered nothing.
    prefix, rest = rows[:80], rows[80:]
    assert all(valid for _, _, valid in prefix)
    before = await produce(kafka_bootstrap, stack.quotes, prefix)
    assert all(
        r.ts < before.records[0].ts // WINDOW_MS * WINDOW_MS + WINDOW_MS for r in before.records
    )

    app_id = f"it-{stack.run}"
    changelog = f"{app_id}-window-state-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(changelog, 3, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()
    by_partition: dict[int, list[Record]] = defaultdict(list)
    for r in before.records:
        by_partition[r.partition].append(r)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for partition, records in by_partition.items():
            by_symbol: dict[str, list[Record]] = defaultdict(list)
            for r in records:
                by_symbol[r.symbol].append(r)
            for symbol, mine in by_symbol.items():
                start = mine[0].ts // WINDOW_MS * WINDOW_MS
                key = json.dumps(f"w|{partition}|{symbol}|{start}").encode()
                await producer.send_and_wait(
                    changelog,
                    key=key,
                    value=json.dumps(v0_window(mine)).encode(),
                    partition=partition,
                )
            clock = [max(r.ts for r in records), -1, max(r.offset for r in records), -1]
            await producer.send_and_wait(
                changelog,
                key=json.dumps(f"c|{partition}").encode(),
                value=json.dumps(clock).encode(),
                partition=partition,
            )
    finally:
        await producer.stop()
    # The old worker's committed position: right after the prefix.
    settings = load_settings(environ=stack.env(free_port()), dotenv_path=None)
    group = clients.consumer(settings.kafka, group_id=app_id, enable_auto_commit=False)
    await group.start()
    try:
        tps = {p: TopicPartition(stack.quotes, p) for p in range(stack.partitions)}
        group.assign(list(tps.values()))
        await group.commit(
            {tps[p]: max(r.offset for r in records) + 1 for p, records in by_partition.items()}
        )
    finally:
        await group.stop()

    after = await produce(kafka_bootstrap, stack.quotes, rest)
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        produced = after
        produced.records = before.records + after.records
        expected, late = expected_windows(produced.records)
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected))
        dlq = await read_all(
            kafka_bootstrap, stack.dlq, until=len(late) + len(produced.invalid), wait_s=30
        )
    finally:
        worker.stop()
    check_output(windows, dlq, produced, stack)
