"""The dbt project (dbt/) on data the pipeline itself produced: a real broker, the real worker
(archive, DuckDB warehouse, anomaly agent), then `scripts/dbt.sh build`, `source freshness` and
`docs generate` as an operator or Airflow runs them, and tampered rows that the tests catch."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from stockstream.warehouse.bigquery_backend import BigQueryWarehouse
from tests.conftest import ROOT, free_port
from tests.integration.conftest import BigQueryEmulator
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
from tests.reference import expected_windows

SYMBOLS = 6
MINUTES = 30
ODD_LOTS = "S001"  # every 5th trade carries condition 12 (odd lot): volume, no price
FORM_T_MINUTE = ("S002", 3)  # every trade of that minute is Form T (24): provisional prices
VOLUME_SPIKE = ("S003", 26)  # volume x1000 in that minute
PRICE_JUMP = ("S004", 27)  # price x1.2 in that minute
# Two distinct trades of S005 in one millisecond from Finnhub's trade websocket (no trade id):
# the first quote of that minute becomes a trade and a second trade at a different price follows.
SAME_MS_TRADES = ("S005", 12)


def crafted() -> list[tuple[bytes, bytes, bool]]:
    """The harness's data set (out-of-order and late quotes, bad records) with trade conditions,
    two anomalies, two distinct trades in one millisecond and, last, a re-delivery of the first
    of them (byte-identical, as a producer retry or a DLQ re-drive sends it; so late that the
    stream drops it, and silver must drop it too)."""
    out: list[tuple[bytes, bytes, bool]] = []
    redelivery: tuple[bytes, bytes, bool] | None = None
    for n, (key, value, valid) in enumerate(dataset(symbols=SYMBOLS, minutes=MINUTES)):
        if valid:
            body = json.loads(value)
            minute = (body["market_timestamp"] - T0) // 60_000
            at = (body["symbol"], minute)
            if body["symbol"] == ODD_LOTS and n % 5 == 0:
                body["conditions"] = ["12"]
            if at == FORM_T_MINUTE:
                body["conditions"] = ["24"]
            if at == VOLUME_SPIKE and body["volume"] is not None:
                body["volume"] *= 1000
            if at == PRICE_JUMP:
                body["current_price"] = round(body["current_price"] * 1.2, 4)
            if at == SAME_MS_TRADES and redelivery is None and body["volume"] is not None:
                body["source"] = "finnhub-trade"
                value = json.dumps(body).encode()
                redelivery = (key, value, True)
                out.append(redelivery)
                other = {**body, "current_price": round(body["current_price"] + 0.01, 4)}
                out.append((key, json.dumps(other).encode(), True))
                continue
            value = json.dumps(body).encode()
        out.append((key, value, valid))
    assert redelivery is not None
    out.append(redelivery)
    return out


def dbt(stack: Stack, target: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """scripts/dbt.sh with the stack's settings; its artifacts in `target`."""
    return subprocess.run(
        [str(ROOT / "scripts" / "dbt.sh"), *argv],
        cwd=ROOT,
        env={
            **stack.env(free_port()),
            "DBT_TARGET_PATH": str(target),
            "DBT_LOG_PATH": str(target / "logs"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )


def results(target: Path) -> dict[str, tuple[str, int]]:
    """Model, test or unit test name -> (status, failures) of the last run (exposures are
    no-ops)."""
    run = json.loads((target / "run_results.json").read_text())
    out: dict[str, tuple[str, int]] = {}
    for r in run["results"]:
        kind, _, *name = r["unique_id"].split(".")
        if kind != "exposure":  # unit_test.<project>.<model>.<name>, test.<project>.<name>.<hash>
            out[name[-1] if kind == "unit_test" else name[0]] = (r["status"], r["failures"] or 0)
    return out


def query(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def metric(worker: Worker, name: str) -> float:
    status, text = worker.get("/metrics/")
    assert status == 200
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def wait_for(check: Any, worker: Worker, what: str, wait_s: float = 150.0) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{worker.tail()}"
        await asyncio.sleep(0.5)


@dataclass
class Pipeline:
    """What the worker wrote, stopped: its data dir, the inputs and the agent's anomalies."""

    stack: Stack
    produced: Produced
    expected: dict[tuple[str, int], dict[str, Any]]
    windows: list[dict[str, Any]]  # the aggregated topic's records (before the re-delivery)
    anomalies: list[dict[str, Any]]


async def run_pipeline(bootstrap: str, data: Path, log: Path) -> Pipeline:
    stack = Stack(
        bootstrap,
        data,
        extra_env={"WAREHOUSE_BATCH_SECONDS": "0.5", "ARCHIVE_BATCH_SECONDS": "1"},
    )
    await create_topics(stack)
    produced = await produce(bootstrap, stack.quotes, crafted())
    expected, late = expected_windows(produced.records)
    assert late, "the data set has late quotes"
    worker = Worker(stack, log)
    try:
        worker.wait_ready()
        await wait_for(
            lambda: (
                metric(worker, 'stockstream_warehouse_rows_total{outcome="written"}')
                >= len(expected)
            ),
            worker,
            "the windows",
        )
        # A window delivered a second time (a re-emit): the warehouse keeps one row for it.
        windows = await read_all(bootstrap, stack.aggregated, until=len(expected))
        _, _, key, again, _ = windows[len(windows) // 2]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(stack.aggregated, value=orjson.dumps(again), key=key)
        finally:
            await producer.stop()
        await wait_for(
            lambda: (
                metric(worker, 'stockstream_warehouse_rows_total{outcome="written"}')
                > len(expected)
            ),
            worker,
            "the window delivered again",
        )
        await wait_for(
            lambda: metric(worker, "stockstream_archive_records_total") >= len(produced.records),
            worker,
            "the archive",
        )
        agent = await read_all(bootstrap, f"anomalies-{stack.run}", until=None, wait_s=5)
    finally:
        # DuckDB allows one process per file: the worker lets go of the warehouse first.
        worker.stop()
    return Pipeline(stack, produced, expected, [w[3] for w in windows], [a[3] for a in agent])


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """One worker run shared by the DuckDB and BigQuery tests (neither changes its files)."""
    root = tmp_path_factory.mktemp("dbt-pipeline")
    return asyncio.run(run_pipeline(kafka_bootstrap, root / "data", root / "worker.log"))


@pytest.mark.integration
def test_dbt_builds_green_on_what_the_pipeline_wrote_and_catches_tampering(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    stack, produced, expected = pipeline.stack, pipeline.produced, pipeline.expected
    # dbt's own file per test: the pipeline's data dir is shared.
    analytics = tmp_path / "analytics.duckdb"
    target = tmp_path / "dbt-target"
    symbols = ",".join(f"S{i:03d}" for i in range(SYMBOLS))
    started = time.monotonic()
    built = dbt(
        stack, target, "build", DBT_ACCEPTED_SYMBOLS=symbols, DBT_DUCKDB_PATH=str(analytics)
    )
    build_seconds = time.monotonic() - started
    assert built.returncode == 0, built.stdout[-6000:]
    outcome = results(target)
    assert all(status in ("success", "pass") for status, _ in outcome.values()), outcome
    tests = [name for name in outcome if name not in MODELS]
    assert len(tests) >= 40, tests
    assert any(name.startswith("matches_recomputed_windows") for name in outcome)
    assert "silver_windows_keeps_the_latest_delivery_of_a_window" in outcome  # a unit test
    print(f"dbt build: {len(outcome)} nodes in {build_seconds:.1f}s")

    assert query(analytics, "select count(*) from silver_windows") == [(len(expected),)]
    assert query(analytics, "select count(*) from audit_windows_recomputed") == [(len(expected),)]
    # Every produced quote but the re-delivery (the last one) is in silver.
    assert query(analytics, "select count(*) from silver_quotes") == [(len(produced.records) - 1,)]
    assert_same_ms_trades_kept_and_redelivery_dropped(analytics, produced, expected)
    assert query(analytics, "select count(*), count(distinct symbol) from gold_daily_summary") == [
        (SYMBOLS, SYMBOLS)
    ]
    # The Form T minute kept its (provisional) prices; the odd lots added volume only.
    form_t = query(
        analytics,
        "select quote_count from silver_windows where symbol = 'S002'"
        f" and window_start_ms = {T0 + FORM_T_MINUTE[1] * 60_000}",
    )
    assert form_t and form_t[0][0] > 0
    found = {
        (s, ms, k): z
        for s, ms, k, z in query(
            analytics, "select symbol, window_start_ms, kind, z from gold_anomalies"
        )
    }
    assert (VOLUME_SPIKE[0], T0 + VOLUME_SPIKE[1] * 60_000, "volume") in found
    assert (PRICE_JUMP[0], T0 + PRICE_JUMP[1] * 60_000, "return") in found
    # What the real-time agent emitted is in gold_anomalies, with the same z.
    emitted = {(a["symbol"], a["window_start_ms"], a["kind"]): a["z"] for a in pipeline.anomalies}
    assert emitted, "the agent emitted the crafted anomalies"
    for anomaly, z in emitted.items():
        assert anomaly in found, anomaly
        assert found[anomaly] == pytest.approx(z, rel=1e-9)

    fresh = dbt(stack, target, "source", "freshness", DBT_DUCKDB_PATH=str(analytics))
    assert fresh.returncode == 0, fresh.stdout[-4000:]
    sources = json.loads((target / "sources.json").read_text())["results"]
    assert sorted(s["status"] for s in sources) == ["pass", "pass"]

    docs = dbt(stack, target, "docs", "generate", DBT_DUCKDB_PATH=str(analytics))
    assert docs.returncode == 0, docs.stdout[-4000:]
    manifest = json.loads((target / "manifest.json").read_text())
    exposures = {e["name"]: e["depends_on"]["nodes"] for e in manifest["exposures"].values()}
    assert exposures == {
        "web_dashboard": [
            "model.stockstream.silver_windows",
            "model.stockstream.gold_daily_summary",
        ],
        "stock_anomalies_topic": ["model.stockstream.gold_anomalies"],
    }
    parents = manifest["parent_map"]
    assert parents["model.stockstream.stg_windows"] == [
        "source.stockstream.warehouse.aggregates_1m"
    ]
    assert parents["model.stockstream.stg_quotes"] == ["source.stockstream.archive.quotes"]
    assert parents["model.stockstream.gold_anomalies"] == ["model.stockstream.silver_windows"]
    assert (target / "catalog.json").exists() and (target / "index.html").exists()

    # Negative checks: a window whose count the archive does not explain, a symbol outside the
    # accepted list. Each is caught by its test, and only by it.
    tampered_db = tmp_path / "warehouse.duckdb"
    shutil.copyfile(stack.data_dir / "warehouse.duckdb", tampered_db)
    conn = duckdb.connect(str(tampered_db))
    try:
        conn.execute(
            'update aggregates_1m set "count" = "count" + 1 where symbol = ?'
            " and window_start = (select min(window_start) from aggregates_1m)",
            ["S005"],
        )
    finally:
        conn.close()
    tampered = dbt(
        stack,
        target,
        "build",
        "--select",
        "silver_windows+",
        DBT_ACCEPTED_SYMBOLS=symbols,
        DBT_DUCKDB_PATH=str(analytics),
        DUCKDB_PATH=str(tampered_db),
    )
    assert tampered.returncode == 1
    failed = {name: n for name, (status, n) in results(target).items() if status == "fail"}
    assert list(failed.values()) == [1] and next(iter(failed)).startswith(
        "matches_recomputed_windows"
    ), failed

    # (A second, incremental run of silver_quotes: the merge adds nothing.)
    narrow = dbt(
        stack,
        target,
        "build",
        "--select",
        "silver_quotes",
        DBT_ACCEPTED_SYMBOLS="S000,S001",
        DBT_DUCKDB_PATH=str(analytics),
    )
    assert narrow.returncode == 1
    failed = {name: n for name, (status, n) in results(target).items() if status == "fail"}
    assert list(failed.values()) == [SYMBOLS - 2] and next(iter(failed)).startswith(
        "accepted_symbols"
    ), failed
    assert query(analytics, "select count(*) from silver_quotes") == [(len(produced.records) - 1,)]


def assert_same_ms_trades_kept_and_redelivery_dropped(
    analytics: Path, produced: Produced, expected: dict[tuple[str, int], dict[str, Any]]
) -> None:
    """Both trades of SAME_MS_TRADES share (symbol, market_timestamp, source) and are in silver
    and in their window; the re-delivery of the first (the last record, late in the stream) is
    not."""
    symbol, minute = SAME_MS_TRADES
    again = produced.records[-1]
    first, second = [r for r in produced.records[:-1] if r.symbol == symbol and r.ts == again.ts]
    assert (again.symbol, again.price, again.volume) == (first.symbol, first.price, first.volume)
    assert (first.ts - T0) // 60_000 == minute and second.price != first.price
    _, late = expected_windows(produced.records)
    assert again in late  # the stream counts it nowhere, so silver must not either
    kept = query(
        analytics,
        "select current_price, kafka_offset from silver_quotes where symbol = ?"
        " and market_timestamp_ms = ? and source = 'finnhub-trade' order by kafka_offset",
        [symbol, first.ts],
    )
    assert kept == [(first.price, first.offset), (second.price, second.offset)]
    start = first.ts // 60_000 * 60_000
    assert query(
        analytics,
        "select quote_count from silver_windows where symbol = ? and window_start_ms = ?",
        [symbol, start],
    ) == [(expected[(symbol, start)]["count"],)]


MODELS = {
    "stg_quotes",
    "stg_windows",
    "silver_quotes",
    "silver_windows",
    "audit_windows_recomputed",
    "gold_daily_summary",
    "gold_anomalies",
}


def archive_rows(data: Path) -> list[dict[str, Any]]:
    """The archive's rows as BigQuery JSON rows (a BigQuery array is never null: [] instead)."""
    conn = duckdb.connect()
    try:
        conn.execute("SET TimeZone = 'UTC'")
        cursor = conn.execute(
            "SELECT * EXCLUDE (conditions), coalesce(conditions, []) AS conditions"
            " FROM read_parquet(?, union_by_name = true, hive_partitioning = false)",
            [str(next((data / "archive").glob("quotes-*")) / "**" / "*.parquet")],
        )
        names = [d[0] for d in cursor.description]
        return [
            {
                k: v.isoformat() if hasattr(v, "isoformat") else v
                for k, v in zip(names, r, strict=True)
            }
            for r in cursor.fetchall()
        ]
    finally:
        conn.close()


ARCHIVE_SCHEMA = [
    ("symbol", "STRING"),
    ("current_price", "FLOAT64"),
    ("market_timestamp", "TIMESTAMP"),
    ("source", "STRING"),
    ("volume", "FLOAT64"),
    ("fetched_at", "TIMESTAMP"),
    ("change_amount", "FLOAT64"),
    ("change_percent", "FLOAT64"),
    ("day_high", "FLOAT64"),
    ("day_low", "FLOAT64"),
    ("day_open", "FLOAT64"),
    ("prev_close", "FLOAT64"),
    ("kafka_partition", "INT64"),
    ("kafka_offset", "INT64"),
    ("kafka_timestamp", "TIMESTAMP"),
]


@pytest.mark.integration
async def test_dbt_builds_on_bigquery_and_keeps_a_window_streamed_twice_once(
    pipeline: Pipeline, bq_emulator: BigQueryEmulator, tmp_path: Path
) -> None:
    dataset_id = f"dbt_{uuid.uuid4().hex[:8]}"
    # The windows through the project's own BigQuery loader, one of them streamed a second time
    # (BigQuery drops a repeated insert id only best effort).
    warehouse = BigQueryWarehouse(
        project=bq_emulator.project,
        dataset=dataset_id,
        table="aggregates_1m",
        api_endpoint=bq_emulator.url,
        retry_deadline_seconds=10,
    )
    try:
        assert await warehouse.write(pipeline.windows) == []
        await asyncio.sleep(0.01)  # a later ingested_at
        assert await warehouse.write([pipeline.windows[7]]) == []
    finally:
        await warehouse.close()
    # The archive as the table BigQuery would read: in production an external table over the
    # bucket's Parquet objects; the emulator has none, so the same rows are loaded into one.
    client = bigquery.Client(
        project=bq_emulator.project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=bq_emulator.url),
    )
    schema = [bigquery.SchemaField(n, t) for n, t in ARCHIVE_SCHEMA]
    schema.append(bigquery.SchemaField("conditions", "STRING", mode="REPEATED"))
    table = client.create_table(
        bigquery.Table(f"{bq_emulator.project}.{dataset_id}.quotes_archive", schema=schema)
    )
    rows = archive_rows(pipeline.stack.data_dir)
    for i in range(0, len(rows), 500):
        assert client.insert_rows_json(table, rows[i : i + 500]) == []

    target = tmp_path / "dbt-target"
    env = {
        "BQ_PROJECT": bq_emulator.project,
        "BQ_DATASET": dataset_id,
        "DBT_BQ_API_ENDPOINT": bq_emulator.url,
        "DBT_ACCEPTED_SYMBOLS": ",".join(f"S{i:03d}" for i in range(SYMBOLS)),
    }
    for run in ("first", "incremental"):
        built = dbt(pipeline.stack, target, "build", "--target", "bigquery", **env)
        assert built.returncode == 0, f"{run}:\n{built.stdout[-6000:]}"
        outcome = results(target)
        assert all(status in ("success", "pass") for status, _ in outcome.values()), outcome
        assert "matches_recomputed_windows" in " ".join(outcome)

    def count(relation: str) -> int:
        name = f"`{bq_emulator.project}.{dataset_id}_analytics.{relation}`"
        return int(next(iter(client.query(f"SELECT count(*) FROM {name}").result()))[0])

    assert count("stg_windows") == len(pipeline.expected) + 1
    assert count("silver_windows") == len(pipeline.expected)
    assert count("silver_quotes") == len(pipeline.produced.records) - 1  # not the re-delivery
    found = client.query(
        f"SELECT symbol, window_start_ms, kind FROM `{dataset_id}_analytics.gold_anomalies`"
    ).result()
    assert {(a["symbol"], a["window_start_ms"], a["kind"]) for a in pipeline.anomalies} <= {
        tuple(r.values()) for r in found
    }
