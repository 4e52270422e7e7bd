"""dbt's `duckdb-s3` target on a real S3 server (SeaweedFS `weed mini`, as tests/integration/
test_archive.py runs it): the archive is written into the bucket by the project's own archive
code (Parquet encoding, object keys `<topic>/date=.../hour=.../*.parquet`, the worker's store
from the S3_* settings), the warehouse's windows are recomputed from that bucket by
`stockstream backfill`'s code, then `scripts/dbt.sh build` runs with the same S3_* settings and
reads the bucket through s3fs. No broker: nothing here depends on Kafka beyond the offsets the
rows carry. A wrong secret must stop the run, not build models on zero rows; S3_SECURE and an
`http://` endpoint choose TLS as they do for the writer."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stockstream.archive import parquet
from stockstream.archive.object_store import from_settings
from stockstream.contracts.quotes import Quote
from stockstream.recovery.backfill import backfill
from stockstream.recovery.recompute import WindowRules
from stockstream.settings import load_settings
from stockstream.warehouse.duckdb_backend import DuckDBWarehouse
from tests.conftest import ROOT
from tests.s3_server import SECRET_KEY, SeaweedS3

pytestmark = pytest.mark.integration

T0 = 1_767_621_360_000  # 2026-01-05T13:56:00Z: the data spans two hour partitions
MINUTES = 8
SYMBOLS = ("AAA", "BBB", "CCC", "DDD")
TOPIC = "stock-quotes"  # the worker's default: the layout an operator's bucket has
PARTITIONS = 2


def feed(seed: int = 11) -> list[parquet.ArchiveRow]:
    """Archived rows of two partitions in offset order: a price walk per symbol, local
    disorder and a few quotes two minutes late (which the windows drop and silver keeps)."""
    rng = random.Random(seed)
    events: list[tuple[int, str, float, float | None]] = []
    for symbol in SYMBOLS:
        price = rng.uniform(10, 500)
        for minute in range(MINUTES):
            for ts in sorted(rng.sample(range(60_000), 6)):
                price = round(price * (1 + rng.gauss(0, 0.002)), 4)
                volume = None if rng.random() < 0.1 else float(rng.randrange(1, 500))
                events.append((T0 + minute * 60_000 + ts, symbol, price, volume))
    events.sort()
    for i in range(0, len(events) - 1, 4):
        events[i], events[i + 1] = events[i + 1], events[i]
    for n, i in enumerate(range(100, len(events), 60)):
        ts, symbol, price, volume = events[i]
        events.insert(i + 1 + n, (ts - 120_000 + 1, symbol, price, volume))
    rows: list[parquet.ArchiveRow] = []
    offsets = [0] * PARTITIONS
    for n, (ts, symbol, price, volume) in enumerate(events):
        partition = SYMBOLS.index(symbol) % PARTITIONS
        quote = Quote(symbol, price, ts, "replay", volume=volume)
        rows.append(parquet.ArchiveRow(partition, offsets[partition], T0 + 600_000 + n, quote))
        offsets[partition] += 1
    return rows


def environment(s3: SeaweedS3, data: Path, **extra: str) -> dict[str, str]:
    """The settings a worker archiving to `s3` would run with (no ./.env of a developer's)."""
    return {
        **os.environ,
        "STOCKSTREAM_ENV": "dev",
        "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
        "STOCKSTREAM_DATA_DIR": str(data),
        "DUCKDB_PATH": str(data / "warehouse.duckdb"),
        "KAFKA_QUOTES_TOPIC": TOPIC,
        **s3.env(),
        "S3_REGION": "us-east-1",
        **extra,
    }


def write_archive_and_warehouse(env: dict[str, str], rows: list[parquet.ArchiveRow]) -> int:
    """The archive into the bucket as the writer batches it (consecutive offsets of one
    partition, one object per event hour), then the windows recomputed from the bucket into the
    DuckDB warehouse. Returns the number of windows."""
    settings = load_settings(environ=env, dotenv_path=None)
    store = from_settings(settings.archive)
    store.ensure_ready()
    for partition in range(PARTITIONS):
        mine = [r for r in rows if r.partition == partition]
        for first in range(0, len(mine), 25):
            for key, group in parquet.split_by_hour(TOPIC, mine[first : first + 25]):
                store.put(key, parquet.encode(group))
    hours = {key.split("/")[2] for key in store.list(f"{TOPIC}/")}
    assert hours == {"hour=13", "hour=14"}, hours

    async def recompute() -> int:
        warehouse = DuckDBWarehouse(Path(env["DUCKDB_PATH"]))
        try:
            rules = WindowRules.from_settings(settings.aggregation)
            end = T0 + (MINUTES + 1) * 60_000
            summary = await backfill(store, warehouse, TOPIC, rules, T0 - 60_000, end)
            return summary.written
        finally:
            await warehouse.close()

    return asyncio.run(recompute())


def dbt(env: dict[str, str], target: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "dbt.sh"), *argv],
        cwd=ROOT,
        env={**env, "DBT_TARGET_PATH": str(target), "DBT_LOG_PATH": str(target / "logs")},
        capture_output=True,
        text=True,
        timeout=300,
    )


def statuses(target: Path) -> dict[str, str]:
    run = json.loads((target / "run_results.json").read_text())
    # Exposures are no-ops.
    return {
        r["unique_id"]: r["status"]
        for r in run["results"]
        if not r["unique_id"].startswith("exposure.")
    }


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_dbt_builds_from_the_s3_archive_and_a_wrong_secret_fails(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    env = environment(s3, data)
    rows = feed()
    windows = write_archive_and_warehouse(env, rows)
    assert windows > len(SYMBOLS) * (MINUTES - 1)

    analytics = tmp_path / "analytics.duckdb"
    target = tmp_path / "dbt-target"
    started = time.monotonic()
    built = dbt({**env, "DBT_DUCKDB_PATH": str(analytics)}, target, "build")
    seconds = time.monotonic() - started
    assert built.returncode == 0, built.stdout[-6000:]
    assert "duckdb-s3" in built.stdout  # the target S3_ENDPOINT selects
    outcome = statuses(target)
    assert outcome and all(s in ("success", "pass") for s in outcome.values()), outcome
    assert any("matches_recomputed_windows" in name for name in outcome)
    print(f"dbt build from S3: {len(outcome)} nodes in {seconds:.1f}s, {len(rows)} rows")

    # Every archived row, from the bucket (its Kafka coordinates are unique per row): there is
    # no local archive to read instead.
    assert not (data / "archive").exists()
    got = query(analytics, "select kafka_partition, kafka_offset from silver_quotes")
    assert sorted(got) == sorted((r.partition, r.offset) for r in rows)
    assert query(analytics, "select count(*) from silver_windows") == [(windows,)]
    # dbt keeps DBT_ENV_SECRET_* values out of its output and log file.
    log = (target / "logs" / "dbt.log").read_text()
    assert SECRET_KEY not in built.stdout and SECRET_KEY not in log

    # A wrong secret: the server refuses the listing and the first model reading the archive
    # errors (the run fails) instead of building on an empty archive.
    bad_target = tmp_path / "dbt-target-bad-secret"
    wrong = {**env, "S3_SECRET_KEY": "not-the-secret", "DBT_DUCKDB_PATH": str(tmp_path / "b.db")}
    refused = dbt(wrong, bad_target, "build")
    assert refused.returncode == 1, refused.stdout[-6000:]
    assert "signature" in refused.stdout, refused.stdout[-6000:]
    assert statuses(bad_target)["model.stockstream.stg_quotes"] == "error"
    assert "not-the-secret" not in refused.stdout

    # S3_SECURE=true against this plain-HTTP server: TLS is attempted and fails; a scheme in
    # S3_ENDPOINT overrides S3_SECURE, as for the archive's writer.
    for endpoint, ok in ((s3.endpoint, False), (f"http://{s3.endpoint}", True)):
        tls = {**env, "S3_ENDPOINT": endpoint, "S3_SECURE": "true"}
        tls["DBT_DUCKDB_PATH"] = str(tmp_path / f"tls-{ok}.db")
        run = dbt(tls, tmp_path / f"dbt-target-tls-{ok}", "build", "--select", "stg_quotes")
        assert (run.returncode == 0) is ok, run.stdout[-6000:]
        assert ok or "SSL" in run.stdout, run.stdout[-6000:]
