"""Backfill and gap report against what the real worker wrote: a real broker, the real worker
(archive + DuckDB warehouse), then `stockstream gaps` and `stockstream backfill` run as the
commands an operator or Airflow runs."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pytest
from aiokafka import AIOKafkaConsumer

from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.contracts.timestamps import iso_utc
from stockstream.recovery import archive_reader
from stockstream.recovery.backfill import backfill
from stockstream.warehouse.bigquery_backend import BigQueryWarehouse
from tests.conftest import ROOT, free_port
from tests.integration.conftest import BigQueryEmulator
from tests.integration.harness import (
    T0,
    Stack,
    Worker,
    create_topics,
    dataset,
    end_offsets,
    produce,
)
from tests.reference import expected_windows
from tests.unit.test_backfill import RULES, TOPIC, archive, feed
from tests.unit.test_backfill import T0 as UNIT_T0

DAY = "2026-01-05"


async def raw_records(bootstrap: str, topic: str, count: int) -> list[tuple[int, int, bytes]]:
    """(partition, offset, value) of the first `count` records, values undecoded (the topic
    holds records that are not JSON)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[tuple[int, int, bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while len(out) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                out.extend((r.partition, r.offset, r.value) for r in batch)
    finally:
        await consumer.stop()
    return out


def rows(db: Path) -> dict[tuple[str, int], dict[str, Any]]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        cursor = conn.execute("SELECT *, epoch_ms(window_start) AS ws FROM aggregates_1m")
        names = [d[0] for d in cursor.description]
        out = {}
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            out[(row["symbol"], row["ws"])] = row
        return out
    finally:
        conn.close()


def without_ingested_at(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "ingested_at"}


def stockstream(stack: Stack, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "stockstream.cli", *argv],
        cwd=ROOT,
        env=stack.env(free_port()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"stockstream {argv}: {done.returncode}\n{done.stderr}"
    return done.stdout


def archived_rows(stack: Stack) -> int:
    store = LocalDirectoryStore(stack.data_dir / "archive")
    found = archive_reader.read_partitions(store, stack.quotes, T0 - 3_600_000, T0 + 7_200_000)
    return sum(len(r) for r in found.values())


def warehouse_rows(worker: Worker) -> float:
    status, text = worker.get("/metrics/")
    assert status == 200
    for line in text.splitlines():
        if line.startswith('stockstream_warehouse_rows_total{outcome="written"}'):
            return float(line.split()[-1])
    return 0.0


async def wait_for(check: Any, worker: Worker, what: str, wait_s: float = 180.0) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{worker.tail()}"
        await asyncio.sleep(0.5)


@pytest.mark.integration
async def test_gaps_finds_deleted_windows_and_backfill_restores_what_the_worker_wrote(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    db = tmp_path / "warehouse.duckdb"
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env={
            "DUCKDB_PATH": str(db),
            "WAREHOUSE_BATCH_SECONDS": "0.5",
            "ARCHIVE_BATCH_SECONDS": "1",
        },
    )
    await create_topics(stack)
    produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=12, minutes=10))
    expected, late = expected_windows(produced.records)
    assert late, "the data set has late quotes"
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_for(lambda: warehouse_rows(worker) >= len(expected), worker, "the windows")
        await wait_for(lambda: archived_rows(stack) == len(produced.records), worker, "the archive")
    finally:
        # DuckDB allows one process per file: the worker lets go of it first.
        worker.stop()
    written = rows(db)
    assert set(written) == set(expected)

    # The whole range recomputed from the archive is what the worker wrote: nothing to do.
    summary = json.loads(
        stockstream(stack, "backfill", "--from", f"{DAY}T14:00Z", "--to", f"{DAY}T16:00Z", "--json")
    )
    assert (summary["computed"], summary["unchanged"]) == (len(expected), len(expected))
    assert (summary["written"], summary["new"], summary["changed"]) == (0, 0, 0)
    assert summary["late"] == len(late)
    assert rows(db) == written

    keys = sorted(written, key=lambda k: (k[1], k[0]))
    deleted = [keys[3], keys[4], keys[40], keys[len(keys) // 2], keys[-1]]
    conn = duckdb.connect(str(db))
    try:
        for symbol, start in deleted:
            conn.execute(
                "DELETE FROM aggregates_1m WHERE symbol = ? AND epoch_ms(window_start) = ?",
                [symbol, start],
            )
    finally:
        conn.close()

    report = json.loads(stockstream(stack, "gaps", "--day", DAY, "--json"))
    assert sorted((g["symbol"], g["window_start"]) for g in report["gaps"]) == sorted(
        (symbol, iso_utc(start)) for symbol, start in deleted
    )
    assert report["archive_windows"] == len(expected)
    assert report["warehouse_windows"] == len(expected) - len(deleted)

    for suggested in report["ranges"]:
        argv = shlex.split(suggested["command"])
        assert argv[:2] == ["stockstream", "backfill"]
        stockstream(stack, *argv[1:])
    restored = rows(db)
    assert set(restored) == set(written)
    for key, row in written.items():
        if key in deleted:
            assert without_ingested_at(restored[key]) == without_ingested_at(row)
        else:
            assert restored[key] == row, key  # untouched, ingested_at included
    assert json.loads(stockstream(stack, "gaps", "--day", DAY, "--json"))["gaps"] == []


@pytest.mark.integration
async def test_an_archived_range_is_republished_per_partition_in_offset_order(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env={"ARCHIVE_BATCH_SECONDS": "1", "WAREHOUSE_ENABLED": "false"},
    )
    await create_topics(stack)
    produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=9, minutes=4))
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_for(lambda: archived_rows(stack) == len(produced.records), worker, "the archive")
    finally:
        worker.stop()
    before = await end_offsets(kafka_bootstrap, stack.quotes, stack.partitions)
    stockstream(
        stack,
        "produce",
        "--source",
        "archive",
        "--from",
        f"{DAY}T14:00Z",
        "--to",
        f"{DAY}T15:00Z",
    )
    total = before + len(produced.records)
    records = await raw_records(kafka_bootstrap, stack.quotes, total)
    assert len(records) == total
    invalid = set(produced.invalid)
    originals = {(r.partition, r.offset) for r in produced.records}
    first: dict[int, list[tuple[str, int, float]]] = {}
    again: dict[int, list[tuple[str, int, float]]] = {}
    for partition, offset, value in sorted(records):
        if (partition, offset) in invalid:
            continue
        body = json.loads(value)
        seen = (body["symbol"], body["market_timestamp"], body["current_price"])
        target = first if (partition, offset) in originals else again
        target.setdefault(partition, []).append(seen)
    # Same partitions (keyed by symbol), same order within each: late quotes stay late.
    assert again == first


@pytest.mark.integration
async def test_backfill_on_bigquery_reads_the_latest_copy_and_is_idempotent(
    bq_emulator: BigQueryEmulator, tmp_path: Path
) -> None:
    store = LocalDirectoryStore(tmp_path / "archive", fsync=False)
    archive(store, feed())
    warehouse = BigQueryWarehouse(
        project=bq_emulator.project,
        dataset=f"backfill_{uuid.uuid4().hex[:8]}",
        table="aggregates_1m",
        api_endpoint=bq_emulator.url,
        retry_deadline_seconds=10,
    )
    end = UNIT_T0 + 600_000
    try:
        first = await backfill(store, warehouse, TOPIC, RULES, UNIT_T0, end)
        assert (first.computed, first.new, first.unchanged) == (50, 50, 0)
        second = await backfill(store, warehouse, TOPIC, RULES, UNIT_T0, end)
        assert (second.written, second.unchanged) == (0, 50)
        # A second, later copy of a window (streaming inserts are at-least-once) stands for it.
        stored = await warehouse.read(UNIT_T0, end, {"BBB"})
        assert len(stored) == 10 and {r["symbol"] for r in stored} == {"BBB"}
        edited = {**stored[0], "close": stored[0]["close"] + 1}
        assert await warehouse.write([edited]) == []
        third = await backfill(store, warehouse, TOPIC, RULES, UNIT_T0, end)
        assert (third.changed, third.unchanged) == (1, 49)
        again = await warehouse.read(UNIT_T0, end, {"BBB"})
        assert again == stored
    finally:
        await warehouse.close()
