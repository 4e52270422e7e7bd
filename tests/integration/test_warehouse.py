"""The warehouse loader end to end: real broker, real worker processes, DuckDB for real and
BigQuery through the real client against `bqemulator` (tests/integration/conftest.py).

The emulator does not deduplicate insert ids, so "each window once" is checked where it is
enforced: the DuckDB upsert here, the dbt models for BigQuery (a later issue)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from stockstream.warehouse import bigquery_backend as bqw
from stockstream.warehouse.base import WarehouseUnavailable
from stockstream.warehouse.bigquery_backend import BigQueryWarehouse, chunks
from tests.integration.conftest import BigQueryEmulator
from tests.integration.harness import (
    Produced,
    Stack,
    Worker,
    create_topics,
    dataset,
    end_offsets,
    produce,
    read_all,
)
from tests.reference import assert_window_equal, expected_windows

FIELDS = (
    "symbol",
    "window_start_ms",
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "open",
    "close",
    "volume",
    "vwap",
    "first_event_ms",
    "last_event_ms",
)


# -- helpers ---------------------------------------------------------------------------------


def metric(worker: Worker, name: str, labels: str = "") -> float:
    """A sample of the worker's /metrics/ (0 when absent)."""
    status, text = worker.get("/metrics/")
    assert status == 200
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def written(worker: Worker) -> float:
    return metric(worker, "stockstream_warehouse_rows_total", '{outcome="written"}')


def rejected(worker: Worker) -> float:
    return metric(worker, "stockstream_warehouse_rows_total", '{outcome="rejected"}')


async def wait_until(
    check: Callable[[], bool], worker: Worker, wait_s: float = 120.0, what: str = ""
) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{worker.tail()}"
        await asyncio.sleep(0.3)


async def produce_raw(bootstrap: str, topic: str, rows: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in rows:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


def bq_client(emulator: BigQueryEmulator) -> bigquery.Client:
    return bigquery.Client(
        project=emulator.project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=emulator.url),
    )


def bq_rows(emulator: BigQueryEmulator, dataset_id: str) -> list[dict[str, Any]]:
    client = bq_client(emulator)
    try:
        table = f"{emulator.project}.{dataset_id}.aggregates_1m"
        return [dict(row.items()) for row in client.list_rows(table)]
    finally:
        client.close()  # type: ignore[no-untyped-call]


def check_rows(rows: list[dict[str, Any]], expected: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Every expected window, nothing else, with the reference values; window_start is the
    UTC TIMESTAMP of window_start_ms."""
    keys = {(r["symbol"], r["window_start_ms"]) for r in rows}
    assert keys == set(expected), (
        f"missing {sorted(set(expected) - keys)[:5]}, extra {sorted(keys - set(expected))[:5]}"
    )
    for row in rows:
        assert_window_equal(
            {name: row[name] for name in FIELDS},
            expected[(row["symbol"], row["window_start_ms"])],
        )
        start = row["window_start"]
        if start.tzinfo is None:  # DuckDB TIMESTAMP: UTC wall time
            start = start.replace(tzinfo=UTC)
        assert start == datetime.fromtimestamp(row["window_start_ms"] / 1000, UTC)


def warehouse_dead_letters(dlq: list[Any]) -> list[dict[str, Any]]:
    return [v for _, _, _, v, _ in dlq if v["reason"] == "warehouse-rejected"]


def bq_stack(bootstrap: str, tmp_path: Path, emulator: BigQueryEmulator, **env: str) -> Stack:
    stack = Stack(bootstrap, tmp_path / "data")
    stack.extra_env = {
        **emulator.env(),
        "BQ_DATASET": f"it_{stack.run}",
        "WAREHOUSE_BATCH_SECONDS": "0.5",
        **env,
    }
    return stack


# -- DuckDB ----------------------------------------------------------------------------------


@pytest.mark.integration
async def test_duckdb_holds_every_window_once_with_the_reference_values(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    db = tmp_path / "warehouse.duckdb"
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env={
            "DUCKDB_PATH": str(db),
            "WAREHOUSE_BATCH_ROWS": "100",
            "WAREHOUSE_BATCH_SECONDS": "0.5",
        },
    )
    await create_topics(stack)
    produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=24, minutes=12))
    expected, _ = expected_windows(produced.records)
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_until(lambda: written(worker) >= len(expected), worker, what="all windows")
        # A window re-emitted (twice, straight into the aggregated topic), and two records the
        # warehouse refuses: one breaking the contract, one not JSON.
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected))
        _, _, key, again, _ = windows[len(windows) // 2]
        bad = {**again, "symbol": "ZZBAD", "count": "many"}
        await produce_raw(
            kafka_bootstrap,
            stack.aggregated,
            [
                (key, orjson.dumps(again)),
                (key, orjson.dumps(again)),
                (b"ZZBAD", orjson.dumps(bad)),
                (b"ZZBAD", b"{not json"),
            ],
        )
        await wait_until(
            lambda: written(worker) >= len(expected) + 2 and rejected(worker) >= 2,
            worker,
            what="the re-emitted and the refused records",
        )
        dlq = await read_all(kafka_bootstrap, stack.dlq, until=None, wait_s=5)
    finally:
        worker.stop()
    conn = duckdb.connect(str(db), read_only=True)
    try:
        cursor = conn.execute("SELECT * FROM aggregates_1m")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    finally:
        conn.close()
    assert len(rows) == len(expected), "a window has more than one row"
    check_rows(rows, expected)
    refused = warehouse_dead_letters(dlq)
    assert len(refused) == 2
    assert all(d["topic"] == stack.aggregated for d in refused)
    errors = sorted(d["error"] for d in refused)
    assert errors[0] == "duckdb rejected the row: count: expected an integer, got 'many'"
    assert errors[1].startswith("duckdb rejected the row: not UTF-8 JSON")
    assert {d["value"] for d in refused} == {orjson.dumps(bad).decode(), "{not json"}


# -- BigQuery (emulator) -----------------------------------------------------------------------


def _record(symbol: str, minute: int, **changes: Any) -> dict[str, Any]:
    start = 1_767_623_400_000 + minute * 60_000
    record: dict[str, Any] = {
        "symbol": symbol,
        "window_start": "",
        "window_end": datetime.fromtimestamp((start + 60_000) / 1000, UTC).isoformat(),
        "window_start_ms": start,
        "count": 2,
        "sum": 3.0,
        "min": 1.0,
        "max": 2.0,
        "avg": 1.5,
        "open": 1.0,
        "close": 2.0,
        "volume": None,
        "vwap": None,
        "first_event_ms": start + 1,
        "last_event_ms": start + 2,
    }
    record.update(changes)
    return record


def test_requests_hold_at_most_500_rows_and_10_mb() -> None:
    def row(i: int, size: int) -> Any:
        return bqw._Row(i, f"S|{i}", {}, size)

    by_count = chunks([row(i, 300) for i in range(1234)])
    assert [len(c) for c in by_count] == [500, 500, 234]
    big = chunks([row(i, 3_000_000) for i in range(7)])
    assert [len(c) for c in big] == [3, 3, 1]
    assert all(sum(r.size for r in c) + bqw._ENVELOPE_BYTES <= bqw.MAX_REQUEST_BYTES for c in big)
    assert [r.index for c in big for r in c] == list(range(7))


@pytest.mark.integration
async def test_bigquery_backend_against_the_emulator(
    bq_emulator: BigQueryEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = f"unit_{uuid.uuid4().hex[:8]}"
    warehouse = BigQueryWarehouse(
        project=bq_emulator.project,
        dataset=dataset_id,
        table="aggregates_1m",
        api_endpoint=bq_emulator.url,
        retry_deadline_seconds=3,
    )
    requests: list[int] = []
    insert = warehouse._insert

    def counting(chunk: list[Any]) -> Any:
        requests.append(len(chunk))
        return insert(chunk)

    monkeypatch.setattr(warehouse, "_insert", counting)
    try:
        records = [_record(f"S{i % 40:02d}", i // 40) for i in range(1234)]
        assert await warehouse.write(records) == []
        assert requests == [500, 500, 234]
        table = bq_client(bq_emulator).get_table(
            f"{bq_emulator.project}.{dataset_id}.aggregates_1m"
        )
        assert table.time_partitioning.type_ == "DAY"
        assert table.time_partitioning.field == "window_start"
        assert table.clustering_fields == ["symbol"]
        # The API spells INT64/FLOAT64 as INTEGER/FLOAT (the emulator echoes what it got).
        legacy = {"INT64": "INTEGER", "FLOAT64": "FLOAT"}
        schema = {f.name: (legacy.get(f.field_type, f.field_type), f.mode) for f in table.schema}
        assert schema == {
            "symbol": ("STRING", "REQUIRED"),
            "window_start": ("TIMESTAMP", "REQUIRED"),
            "window_end": ("TIMESTAMP", "REQUIRED"),
            "window_start_ms": ("INTEGER", "REQUIRED"),
            "count": ("INTEGER", "REQUIRED"),
            **{n: ("FLOAT", "REQUIRED") for n in ("sum", "min", "max", "avg", "open", "close")},
            "volume": ("FLOAT", "NULLABLE"),
            "vwap": ("FLOAT", "NULLABLE"),
            "first_event_ms": ("INTEGER", "REQUIRED"),
            "last_event_ms": ("INTEGER", "REQUIRED"),
            "ingested_at": ("TIMESTAMP", "REQUIRED"),
        }
        # Rows BigQuery refuses come back with its error; the others of the request are stored.
        mixed = [
            _record("GOOD1", 0),
            _record("BAD1", 0, count="many"),
            _record("BAD2", 0, window_end="not a time"),
            _record("NOKEY", 0, window_start_ms="x"),
            _record("GOOD2", 0),
        ]
        refused = await warehouse.write(mixed)
        assert [r.index for r in refused] == [1, 2, 3]
        assert refused[0].error.startswith("bigquery: invalid: ")
        assert refused[2].error.startswith("window_start_ms:")
        symbols = Counter(r["symbol"] for r in bq_rows(bq_emulator, dataset_id))
        assert symbols["GOOD1"] == symbols["GOOD2"] == 1
        assert "BAD1" not in symbols and "BAD2" not in symbols
        assert sum(symbols.values()) == 1234 + 2
    finally:
        await warehouse.close()


@pytest.mark.integration
async def test_bigquery_unreachable_is_transient_within_the_deadline(tmp_path: Path) -> None:
    from tests.conftest import free_port

    warehouse = BigQueryWarehouse(
        project="test-project",
        dataset="nowhere",
        table="aggregates_1m",
        api_endpoint=f"http://127.0.0.1:{free_port()}",
        retry_deadline_seconds=2,
    )
    started = time.monotonic()
    try:
        with pytest.raises(WarehouseUnavailable, match="unreachable"):
            await warehouse.write([_record("AAPL", 0)])
    finally:
        await warehouse.close()
    assert time.monotonic() - started < 10


@pytest.mark.integration
async def test_worker_streams_windows_to_bigquery_and_dead_letters_refused_rows(
    kafka_bootstrap: str, bq_emulator: BigQueryEmulator, tmp_path: Path
) -> None:
    # A short retry deadline: a bad row must not be mistaken for an outage for long.
    stack = bq_stack(kafka_bootstrap, tmp_path, bq_emulator, WAREHOUSE_RETRY_DEADLINE_SECONDS="5")
    await create_topics(stack)
    produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=12, minutes=8))
    expected, _ = expected_windows(produced.records)
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_until(lambda: written(worker) >= len(expected), worker, what="all windows")
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected))
        bad = {**windows[0][3], "symbol": "ZZBAD", "count": "many"}
        await produce_raw(kafka_bootstrap, stack.aggregated, [(b"ZZBAD", orjson.dumps(bad))])
        await wait_until(lambda: rejected(worker) >= 1, worker, what="the refused row")
        dlq = await read_all(kafka_bootstrap, stack.dlq, until=None, wait_s=5)
    finally:
        worker.stop()
    dataset_id = stack.extra_env["BQ_DATASET"]
    table = bq_client(bq_emulator).get_table(f"{bq_emulator.project}.{dataset_id}.aggregates_1m")
    assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY", "window_start")
    assert table.clustering_fields == ["symbol"]
    rows = bq_rows(bq_emulator, dataset_id)
    check_rows(rows, expected)
    # One clean run: every window streamed once (the emulator would keep duplicates).
    assert len(rows) == len(expected)
    refused = warehouse_dead_letters(dlq)
    assert len(refused) == 1
    assert refused[0]["value"] == orjson.dumps(bad).decode()
    assert refused[0]["topic"] == stack.aggregated
    assert refused[0]["error"].startswith("bigquery rejected the row: bigquery: invalid: ")


@pytest.mark.integration
async def test_bigquery_outage_back_pressures_and_recovers_with_nothing_lost(
    kafka_bootstrap: str, own_bq_emulator: BigQueryEmulator, tmp_path: Path
) -> None:
    emulator = own_bq_emulator
    stack = bq_stack(kafka_bootstrap, tmp_path, emulator, WAREHOUSE_RETRY_DEADLINE_SECONDS="3")
    await create_topics(stack)
    rows_in = dataset(symbols=12, minutes=20, seed=5)
    half = len(rows_in) // 2
    first = await produce(kafka_bootstrap, stack.quotes, rows_in[:half])
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_until(lambda: written(worker) > 0, worker, what="the first rows")
        emulator.stop()
        written_at_outage = written(worker)
        second = await produce(kafka_bootstrap, stack.quotes, rows_in[half:])
        produced = Produced(first.records + second.records, first.invalid + second.invalid)
        expected, _ = expected_windows(produced.records)
        # The aggregation agent is not held up by the warehouse loader waiting for BigQuery:
        # every window reaches the aggregated topic during the outage.
        deadline = time.monotonic() + 120
        while await end_offsets(kafka_bootstrap, stack.aggregated, 3) < len(expected):
            assert time.monotonic() < deadline, worker.tail()
            await asyncio.sleep(0.3)
        await wait_until(
            lambda: metric(worker, "stockstream_warehouse_failures_total") >= 2,
            worker,
            what="failed attempts",
        )
        assert metric(worker, "stockstream_warehouse_up") == 0
        assert written_at_outage <= written(worker) < len(expected)
        emulator.start()
        await wait_until(
            lambda: written(worker) >= len(expected), worker, what="recovery after the outage"
        )
        assert metric(worker, "stockstream_warehouse_up") == 1
        dlq = await read_all(kafka_bootstrap, stack.dlq, until=None, wait_s=3)
    finally:
        worker.stop()
    rows = bq_rows(emulator, stack.extra_env["BQ_DATASET"])
    check_rows(rows, expected)
    # At-least-once into BigQuery: a batch cut by the outage may be sent again, with the same
    # insert ids (BigQuery drops those; the emulator keeps them), never with other values.
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["symbol"], row["window_start_ms"]), []).append(row)
    for copies in by_key.values():
        assert all({f: c[f] for f in FIELDS} == {f: copies[0][f] for f in FIELDS} for c in copies)
    assert warehouse_dead_letters(dlq) == [], "an outage must not dead-letter anything"


@pytest.mark.integration
async def test_outage_with_a_backlog_holds_up_neither_aggregation_nor_shutdown(
    kafka_bootstrap: str, own_bq_emulator: BigQueryEmulator, tmp_path: Path
) -> None:
    """The case that stalls a loader written as a Faust agent (warehouse/loader.py explains):
    BigQuery down and a backlog in the aggregated topic. The aggregation must go on, SIGTERM
    must stop the worker, and a worker started after the outage must load everything."""
    emulator = own_bq_emulator
    emulator.stop()  # down from the start
    stack = bq_stack(kafka_bootstrap, tmp_path, emulator, WAREHOUSE_RETRY_DEADLINE_SECONDS="2")
    await create_topics(stack)
    backlog = [_record(f"BK{i % 50:02d}", 10_000 + i // 50) for i in range(20_000)]
    first = Worker(stack, tmp_path / "worker-1.log")
    try:
        first.wait_ready()
        await produce_raw_many(
            kafka_bootstrap, stack.aggregated, [(r["symbol"].encode(), r) for r in backlog]
        )
        produced = await produce(kafka_bootstrap, stack.quotes, dataset(symbols=12, minutes=6))
        expected, _ = expected_windows(produced.records)
        deadline = time.monotonic() + 60
        while await end_offsets(kafka_bootstrap, stack.aggregated, 3) < len(backlog) + len(
            expected
        ):
            assert time.monotonic() < deadline, f"aggregation held up:\n{first.tail()}"
            await asyncio.sleep(0.3)
        await wait_until(
            lambda: metric(first, "stockstream_warehouse_failures_total") >= 1,
            first,
            what="a failed attempt",
        )
        assert written(first) == 0
    finally:
        stopping = time.monotonic()
        first.stop()
    assert first.proc.returncode == 0
    assert time.monotonic() - stopping < 20, "SIGTERM must stop the worker during an outage"
    emulator.start()
    second = Worker(stack, tmp_path / "worker-2.log")
    try:
        second.wait_ready()
        await wait_until(
            lambda: written(second) >= len(backlog) + len(expected),
            second,
            wait_s=180,
            what="everything loaded after the outage",
        )
    finally:
        second.stop()
    rows = bq_rows(emulator, stack.extra_env["BQ_DATASET"])
    check_rows([r for r in rows if not r["symbol"].startswith("BK")], expected)
    assert {(r["symbol"], r["window_start_ms"]) for r in rows if r["symbol"].startswith("BK")} == {
        (r["symbol"], r["window_start_ms"]) for r in backlog
    }


async def produce_raw_many(
    bootstrap: str, topic: str, rows: list[tuple[bytes, dict[str, Any]]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=orjson.dumps(v), key=k) for k, v in rows]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_credentials_from_a_service_account_file_or_application_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import google.auth
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    key_file = tmp_path / "sa.json"  # e.g. a mounted secret file
    key_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "from-key",
                "private_key_id": "1",
                "private_key": pem,
                "client_email": "loader@from-key.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    from_file = BigQueryWarehouse(
        project="", dataset="stock", table="aggregates_1m", credentials_file=key_file
    ).client()
    assert from_file.project == "from-key"
    assert isinstance(from_file._credentials, service_account.Credentials)
    assert from_file._credentials.service_account_email.startswith("loader@")

    adc = AnonymousCredentials()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(google.auth, "default", lambda scopes=None: (adc, "adc-project"))
    from_adc = BigQueryWarehouse(project="", dataset="stock", table="aggregates_1m").client()
    assert (from_adc.project, from_adc._credentials) == ("adc-project", adc)
    explicit = BigQueryWarehouse(project="mine", dataset="stock", table="aggregates_1m").client()
    assert explicit.project == "mine"
