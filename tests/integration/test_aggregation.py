"""End to end against a real broker and real worker processes: every window exactly once,
values equal to an independent recomputation, late and bad records dead-lettered, also
across a SIGKILL of the worker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    Produced,
    Stack,
    Worker,
    committed_offsets,
    create_topics,
    dataset,
    end_offsets,
    partition_end_offsets,
    produce,
    read_all,
)
from tests.reference import assert_window_equal, expected_windows

pytestmark = pytest.mark.integration


def check_output(windows: list[Any], dlq: list[Any], produced: Produced, stack: Stack) -> None:
    expected, late = expected_windows(produced.records)
    keys = [(v["symbol"], v["window_start_ms"]) for _, _, _, v, _ in windows]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert duplicates == [], f"windows emitted more than once: {duplicates[:5]}"
    assert set(keys) == set(expected), (
        f"missing {sorted(set(expected) - set(keys))[:5]}, "
        f"extra {sorted(set(keys) - set(expected))[:5]}"
    )
    for _, _, key, value, timestamp_ms in windows:
        assert key == value["symbol"].encode()
        assert "__faust" not in value
        assert_window_equal(value, expected[(value["symbol"], value["window_start_ms"])])
        assert value["window_start"].endswith("Z") and value["window_end"].endswith("Z")
        # Emit time, not the (replayed, months-old) event time: time-based retention would
        # otherwise delete the windows as soon as the broker checks.
        assert abs(timestamp_ms / 1000 - time.time()) < 3600
    # Output partition p holds exactly the windows of source partition p.
    source_partition = {r.symbol: r.partition for r in produced.records}
    assert all(p == source_partition[v["symbol"]] for p, _, _, v, _ in windows)
    reasons = Counter(v["reason"] for _, _, _, v, _ in dlq)
    assert reasons["late"] == len(late)
    assert reasons["malformed"] + reasons["invalid"] == len(produced.invalid)
    dead = {(v["partition"], v["offset"]) for _, _, _, v, _ in dlq}
    assert {(r.partition, r.offset) for r in late} <= dead
    assert set(produced.invalid) <= dead
    assert all(v["topic"] == stack.quotes for _, _, _, v, _ in dlq)


async def test_windows_exactly_once_and_equal_to_recomputation(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    await create_topics(stack)
    produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=24, minutes=12))
    assert len({r.partition for r in produced.records}) == 3
    expected, late = expected_windows(produced.records)
    assert late, "the data set must contain late events"
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected))
        dlq = await read_all(
            kafka_bootstrap, stack.dlq, until=len(late) + len(produced.invalid), wait_s=30
        )
        status, open_windows = worker.get("/windows/")
        assert status == 200
        assert all(not p["open"] for p in open_windows.values())
        status, metrics = worker.get("/metrics/")
        assert status == 200
        assert 'stockstream_quotes_total{outcome="late"}' in metrics
        assert "stockstream_windows_emitted_total" in metrics
    finally:
        worker.stop()
    check_output(windows, dlq, produced, stack)


async def test_the_worker_commits_what_it_processed_fetch_after_fetch(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Quotes arriving in bursts reach the agent as many batches per partition; the group's
    committed offsets must follow each of them to the end (a batch standing for one offset
    only once stopped the commits after the first batch: nothing lost, but every restart
    replayed everything)."""
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    await create_topics(stack)
    rows = dataset(symbols=12, minutes=6, seed=5)
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        chunk = len(rows) // 8 + 1
        for start in range(0, len(rows), chunk):
            await produce(kafka_bootstrap, stack.quotes, rows[start : start + chunk])
            await asyncio.sleep(0.4)  # so each burst is a fetch, i.e. a batch, of its own
        ends = {
            p: end
            for p, end in (await partition_end_offsets(kafka_bootstrap, stack.quotes, 3)).items()
            if end  # nothing to commit in an empty partition
        }
        assert len(ends) >= 2
        deadline = time.monotonic() + 60
        while (
            committed := await committed_offsets(kafka_bootstrap, f"it-{stack.run}", stack.quotes)
        ) != ends:
            assert time.monotonic() < deadline, (committed, ends, worker.tail())
            await asyncio.sleep(0.5)
    finally:
        worker.stop()


async def test_sigkill_mid_stream_loses_nothing_and_emits_nothing_twice(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    await create_topics(stack)
    produced = await produce(
        kafka_bootstrap, stack.quotes, dataset(symbols=30, minutes=40, seed=11)
    )
    expected, late = expected_windows(produced.records)
    first = Worker(stack, tmp_path / "worker-1.log")
    try:
        first.wait_ready()
        deadline = time.monotonic() + 120
        while await end_offsets(kafka_bootstrap, stack.aggregated, 3) < len(expected) // 3:
            assert time.monotonic() < deadline, first.tail()
            await asyncio.sleep(0.2)
    finally:
        first.kill()
    emitted_at_kill = await end_offsets(kafka_bootstrap, stack.aggregated, 3)
    assert emitted_at_kill < len(expected), "the kill must happen mid-stream"
    second = Worker(stack, tmp_path / "worker-2.log")
    try:
        second.wait_ready()
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected), settle=5.0)
        dlq = await read_all(
            kafka_bootstrap, stack.dlq, until=len(late) + len(produced.invalid), wait_s=30
        )
    finally:
        second.stop()
    check_output(windows, _dedupe_dlq(dlq), produced, stack)


def _dedupe_dlq(dlq: list[Any]) -> list[Any]:
    """The DLQ is at-least-once: a record dead-lettered just before the kill may be
    dead-lettered again after it. Each source record must be there at least once."""
    seen: dict[tuple[int, int], Any] = {}
    for row in dlq:
        seen.setdefault((row[3]["partition"], row[3]["offset"]), row)
    return list(seen.values())
