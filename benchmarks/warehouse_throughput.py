"""Rows per second into the warehouse back-ends, through the same classes the loader uses.

    python benchmarks/warehouse_throughput.py [--rows 200000] [--bq-rows 20000]
        [--batch 500] [--skip-bigquery] [--keep]

- DuckDB (warehouse/duckdb_backend.py), a fresh file: `--rows` new windows in batches of
  `--batch` (the loader's WAREHOUSE_BATCH_ROWS), then the same windows again (every row an
  upsert of an existing key), then the new-rows run with the file released after each batch
  (`hold_connection=False`). The table's row count is checked after each run.
- BigQuery (warehouse/bigquery_backend.py) against `bqemulator` started on loopback as in the
  tests (tests/integration/conftest.py): `--bq-rows` windows in batches of `--batch` (one
  insertAll request of at most 500 rows each). The emulator runs DuckDB behind a REST API on
  this machine: the figure is the client + emulator cost, not BigQuery's (whose streaming
  latency is network-bound; its quota is far above these rates).

Prints figures, never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.integration.conftest: the emulator launcher

from stockstream.contracts.timestamps import iso_utc  # noqa: E402
from stockstream.warehouse.bigquery_backend import BigQueryWarehouse  # noqa: E402
from stockstream.warehouse.duckdb_backend import DuckDBWarehouse  # noqa: E402

T0 = 1_767_623_400_000  # 2026-01-05T14:30:00Z


def windows(count: int, symbols: int = 500) -> list[dict[str, Any]]:
    """`count` distinct aggregated records, `symbols` symbols, consecutive minutes."""
    out = []
    for i in range(count):
        start = T0 + (i // symbols) * 60_000
        price = 100.0 + (i % 997) / 100
        out.append(
            {
                "symbol": f"SYM{i % symbols:04d}",
                "window_start": iso_utc(start),
                "window_end": iso_utc(start + 60_000),
                "window_start_ms": start,
                "count": 12,
                "sum": price * 12,
                "min": price - 0.5,
                "max": price + 0.5,
                "avg": price,
                "open": price - 0.25,
                "close": price + 0.25,
                "volume": None if i % 10 == 0 else 1200.0,
                "vwap": None if i % 10 == 0 else price + 0.01,
                "first_event_ms": start + 250,
                "last_event_ms": start + 59_750,
            }
        )
    return out


async def timed(
    write: Callable[[Sequence[dict[str, Any]]], Awaitable[Any]],
    records: list[dict[str, Any]],
    batch: int,
) -> tuple[float, list[float]]:
    """(seconds, per-batch latencies) to write `records` in batches of `batch`, in order."""
    latencies = []
    started = time.perf_counter()
    for i in range(0, len(records), batch):
        t = time.perf_counter()
        refused = await write(records[i : i + batch])
        latencies.append(time.perf_counter() - t)
        assert not refused, refused[:3]
    return time.perf_counter() - started, latencies


def line(label: str, rows: int, seconds: float, latencies: list[float]) -> None:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    print(
        f"  {label:<44} {rows:>8} rows {seconds:8.2f} s {rows / seconds:>10,.0f} rows/s"
        f"   batch p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
    )


def count_rows(path: Path) -> int:
    conn = duckdb.connect(str(path), read_only=True)
    try:
        row = conn.execute("SELECT count(*) FROM aggregates_1m").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


async def bench_duckdb(workdir: Path, rows: int, batch: int) -> None:
    records = windows(rows)
    print(f"DuckDB {duckdb.__version__} ({workdir}), batches of {batch}:")
    path = workdir / "bench.duckdb"
    warehouse = DuckDBWarehouse(path)
    try:
        seconds, lat = await timed(warehouse.write, records, batch)
        line("new windows (insert)", rows, seconds, lat)
        seconds, lat = await timed(warehouse.write, records, batch)
        line("same windows again (upsert, no new row)", rows, seconds, lat)
    finally:
        await warehouse.close()
    stored = count_rows(path)
    print(f"  rows in the table: {stored} (expected {rows}){'' if stored == rows else '  !!!'}")
    size_mb = path.stat().st_size / 1e6
    print(f"  file size: {size_mb:.1f} MB ({size_mb * 1e6 / max(1, stored):.0f} bytes/row)")
    released = workdir / "released.duckdb"
    warehouse = DuckDBWarehouse(released, hold_connection=False)
    try:
        seconds, lat = await timed(warehouse.write, records, batch)
        line("new windows, file released after each batch", rows, seconds, lat)
    finally:
        await warehouse.close()
    assert count_rows(released) == rows


async def bench_bigquery(workdir: Path, rows: int, batch: int) -> None:
    from tests.integration.conftest import BigQueryEmulator

    emulator = BigQueryEmulator(workdir / "bqemulator")
    started = time.perf_counter()
    emulator.start()
    print(f"bqemulator on {emulator.url} (ready in {time.perf_counter() - started:.1f} s):")
    warehouse = BigQueryWarehouse(
        project=emulator.project,
        dataset="bench",
        table="aggregates_1m",
        api_endpoint=emulator.url,
        retry_deadline_seconds=30,
    )
    try:
        t = time.perf_counter()
        await warehouse.write(windows(1, symbols=1))  # creates dataset and table
        print(f"  dataset + table created, first row: {(time.perf_counter() - t) * 1000:.0f} ms")
        records = windows(rows)
        seconds, lat = await timed(warehouse.write, records, batch)
        line(f"streamed, {min(batch, 500)}-row insertAll requests", rows, seconds, lat)
        big = min(rows, 5_000)
        seconds, lat = await timed(warehouse.write, records[:big], big)
        line(f"one write of {big} rows (chunked by 500)", big, seconds, lat)
    finally:
        await warehouse.close()
        emulator.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="DuckDB rows (default 200000)")
    parser.add_argument("--bq-rows", type=int, default=20_000, help="emulator rows (20000)")
    parser.add_argument("--batch", type=int, default=500, help="rows per write (500)")
    parser.add_argument("--skip-bigquery", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="warehouse-bench-"))
    print(f"python {platform.python_version()}, {platform.machine()}, {platform.system()}")
    try:
        await bench_duckdb(workdir, args.rows, args.batch)
        if not args.skip_bigquery:
            await bench_bigquery(workdir, args.bq_rows, args.batch)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
