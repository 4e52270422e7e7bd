"""The DuckDB warehouse for real (a file per test): one row per window whatever is replayed,
contract types, refused rows, concurrent batches, the file lock, and the path setting."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stockstream.contracts.timestamps import iso_utc
from stockstream.settings import load_settings
from stockstream.warehouse.backends import duckdb_path, from_settings
from stockstream.warehouse.base import Rejected, WarehouseUnavailable, insert_id
from stockstream.warehouse.duckdb_backend import DuckDBWarehouse

T0 = 1_767_623_400_000  # 2026-01-05T14:30:00Z


def window(symbol: str = "AAPL", minute: int = 0, **changes: Any) -> dict[str, Any]:
    """A `stock-quotes-aggregated` record, as the aggregation agent writes it."""
    start = T0 + minute * 60_000
    record = {
        "symbol": symbol,
        "window_start": iso_utc(start),
        "window_end": iso_utc(start + 60_000),
        "window_start_ms": start,
        "count": 3,
        "sum": 301.5,
        "min": 100.25,
        "max": 100.75,
        "avg": 100.5,
        "open": 100.25,
        "close": 100.5,
        "volume": 30.0,
        "vwap": 100.55,
        "first_event_ms": start + 1_000,
        "last_event_ms": start + 59_000,
    }
    record.update(changes)
    return record


def rows(path: Path, order: str = "symbol, window_start") -> list[dict[str, Any]]:
    conn = duckdb.connect(str(path), read_only=True)
    try:
        cursor = conn.execute(f"SELECT * FROM aggregates_1m ORDER BY {order}")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "warehouse.duckdb"


async def test_a_window_written_again_replaces_its_row(path: Path) -> None:
    warehouse = DuckDBWarehouse(path)
    try:
        assert (
            await warehouse.write([window("AAPL", 0), window("AAPL", 1), window("MSFT", 0)]) == []
        )
        # Replay of the same windows (Kafka redelivery), one with a changed value, and a
        # window twice in one batch: the last one wins.
        again = [
            window("AAPL", 0),
            window("AAPL", 1, close=101.0),
            window("MSFT", 0, count=4),
            window("MSFT", 0, count=5),
        ]
        assert await warehouse.write(again) == []
    finally:
        await warehouse.close()
    stored = rows(path)
    assert [(r["symbol"], r["window_start_ms"]) for r in stored] == [
        ("AAPL", T0),
        ("AAPL", T0 + 60_000),
        ("MSFT", T0),
    ]
    assert stored[1]["close"] == 101.0
    assert stored[2]["count"] == 5


async def test_columns_have_the_contract_types_and_values(path: Path) -> None:
    before = datetime.now(UTC).replace(tzinfo=None)
    warehouse = DuckDBWarehouse(path)
    try:
        await warehouse.write([window("BRK.B", 0, volume=None, vwap=None), window("AAPL", 2)])
    finally:
        await warehouse.close()
    conn = duckdb.connect(str(path), read_only=True)
    try:
        described = conn.execute("DESCRIBE aggregates_1m").fetchall()
        key = conn.execute(
            "SELECT constraint_column_names FROM duckdb_constraints()"
            " WHERE table_name = 'aggregates_1m' AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()
    finally:
        conn.close()
    types = {name: kind for name, kind, *_ in described}
    assert types == {
        "symbol": "VARCHAR",
        "window_start": "TIMESTAMP",
        "window_end": "TIMESTAMP",
        "window_start_ms": "BIGINT",
        "count": "BIGINT",
        "sum": "DOUBLE",
        "min": "DOUBLE",
        "max": "DOUBLE",
        "avg": "DOUBLE",
        "open": "DOUBLE",
        "close": "DOUBLE",
        "volume": "DOUBLE",
        "vwap": "DOUBLE",
        "first_event_ms": "BIGINT",
        "last_event_ms": "BIGINT",
        "ingested_at": "TIMESTAMP",
    }
    assert key == [(["symbol", "window_start"],)]
    aapl, brk = rows(path)
    # TIMESTAMPs hold UTC wall time.
    assert brk["window_start"] == datetime(2026, 1, 5, 14, 30)
    assert brk["window_end"] == datetime(2026, 1, 5, 14, 31)
    assert aapl["window_start"] == datetime(2026, 1, 5, 14, 32)
    assert brk["volume"] is None and brk["vwap"] is None
    expected = window("AAPL", 2)
    for name in ("count", "sum", "min", "max", "avg", "open", "close", "volume", "vwap"):
        assert aapl[name] == expected[name], name
    assert aapl["first_event_ms"] == expected["first_event_ms"]
    assert (
        before - timedelta(seconds=1)
        <= aapl["ingested_at"]
        <= datetime.now(UTC).replace(tzinfo=None)
    )


async def test_records_breaking_the_contract_are_refused_and_the_rest_written(
    path: Path,
) -> None:
    batch: list[Any] = [
        window("AAPL", 0),
        window("MSFT", 0, count="many"),
        {k: v for k, v in window("TSLA", 0).items() if k != "symbol"},
        window("GOOGL", 0, window_end="yesterday"),
        window("AMZN", 0, window_start_ms=9 * 10**15),
        window("NVDA", 0, close=None),
        ["not", "an", "object"],
        window("META", 0, volume=True),
        window("AAPL", 1),
    ]
    warehouse = DuckDBWarehouse(path)
    try:
        rejected = await warehouse.write(batch)
    finally:
        await warehouse.close()
    assert [r.index for r in rejected] == [1, 2, 3, 4, 5, 6, 7]
    errors = {r.index: r.error for r in rejected}
    assert errors[1] == "count: expected an integer, got 'many'"
    assert errors[2].startswith("symbol:")
    assert "window_end" in errors[3]
    assert "window_start_ms" in errors[4]
    assert errors[5] == "close: expected a number, got None"
    assert "JSON object" in errors[6]
    assert errors[7].startswith("volume:")
    assert [(r["symbol"], r["window_start_ms"]) for r in rows(path)] == [
        ("AAPL", T0),
        ("AAPL", T0 + 60_000),
    ]


async def test_rows_the_database_refuses_are_found_one_by_one(path: Path) -> None:
    """A table with a stricter constraint than ours (created beforehand, kept by CREATE TABLE
    IF NOT EXISTS): DuckDB refuses the whole batch, the loader isolates the bad row."""
    path.parent.mkdir(parents=True)
    warehouse = DuckDBWarehouse(path)
    try:
        await warehouse.write([window("AAPL", 0)])
    finally:
        await warehouse.close()
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE strict AS SELECT * FROM aggregates_1m LIMIT 0")
    conn.execute("DROP TABLE aggregates_1m")
    conn.execute(
        "CREATE TABLE aggregates_1m (symbol VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL,"
        " window_end TIMESTAMP NOT NULL, window_start_ms BIGINT NOT NULL,"
        ' "count" BIGINT NOT NULL CHECK ("count" < 100), "sum" DOUBLE NOT NULL,'
        ' "min" DOUBLE NOT NULL, "max" DOUBLE NOT NULL, avg DOUBLE NOT NULL,'
        ' "open" DOUBLE NOT NULL, "close" DOUBLE NOT NULL, volume DOUBLE, vwap DOUBLE,'
        " first_event_ms BIGINT NOT NULL, last_event_ms BIGINT NOT NULL,"
        " ingested_at TIMESTAMP NOT NULL, PRIMARY KEY (symbol, window_start))"
    )
    conn.close()
    warehouse = DuckDBWarehouse(path)
    try:
        rejected = await warehouse.write(
            [window("AAPL", 0), window("MSFT", 0, count=1000), window("TSLA", 0)]
        )
    finally:
        await warehouse.close()
    assert [r.index for r in rejected] == [1]
    assert rejected[0].error.startswith("duckdb: ") and "CHECK" in rejected[0].error
    assert [r["symbol"] for r in rows(path)] == ["AAPL", "TSLA"]


async def test_concurrent_batches_are_serialised_and_keep_one_row_per_window(
    path: Path,
) -> None:
    warehouse = DuckDBWarehouse(path)
    symbols = [f"S{i:02d}" for i in range(20)]
    batches = [
        # Overlapping batches: every batch rewrites minutes 0..9 of a rotating set of symbols.
        [window(symbols[(b + s) % 20], m, count=b + 1) for s in range(5) for m in range(10)]
        for b in range(40)
    ]
    try:
        results = await asyncio.gather(*(warehouse.write(batch) for batch in batches))
    finally:
        await warehouse.close()
    assert all(r == [] for r in results)
    stored = rows(path)
    assert len(stored) == len({(r["symbol"], r["window_start"]) for r in stored}) == 200
    # Batches ran in submission order on the one DuckDB thread: the last writer of a symbol wins.
    last = {}
    for b, batch in enumerate(batches):
        for record in batch:
            last[record["symbol"]] = b + 1
    assert {r["symbol"]: r["count"] for r in stored} == last


async def test_the_file_survives_a_restart_and_replays_add_no_rows(path: Path) -> None:
    first = DuckDBWarehouse(path)
    await first.write([window("AAPL", m) for m in range(30)])
    await first.close()
    second = DuckDBWarehouse(path)
    await second.write([window("AAPL", m) for m in range(20, 40)])
    await second.close()
    assert len(rows(path)) == 40


def _hold(path: Path, read_only: bool = False) -> subprocess.Popen[str]:
    """Another process that opens the file and keeps it open until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys, duckdb
        conn = duckdb.connect({str(path)!r}, read_only={read_only})
        print("open", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def _read_in_another_process(path: Path) -> tuple[bool, str]:
    code = (
        "import duckdb, sys\n"
        f"c = duckdb.connect({str(path)!r}, read_only=True)\n"
        "print(c.execute('SELECT count(*) FROM aggregates_1m').fetchone()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


async def test_a_file_locked_by_another_process_is_a_transient_failure(path: Path) -> None:
    path.parent.mkdir(parents=True)
    holder = _hold(path)
    warehouse = DuckDBWarehouse(path)
    try:
        with pytest.raises(WarehouseUnavailable, match="lock"):
            await warehouse.write([window("AAPL", 0)])
        _release(holder)
        # The same batch, again: written now.
        assert await warehouse.write([window("AAPL", 0)]) == []
    finally:
        if holder.poll() is None:
            _release(holder)
        await warehouse.close()
    assert len(rows(path)) == 1


async def test_while_the_worker_holds_the_file_no_other_process_can_read_it(path: Path) -> None:
    warehouse = DuckDBWarehouse(path)  # hold_connection=True: the worker's default
    try:
        await warehouse.write([window("AAPL", 0)])
        ok, output = _read_in_another_process(path)
        assert not ok and "Conflicting lock" in output
    finally:
        await warehouse.close()
    assert _read_in_another_process(path) == (True, "1")


async def test_released_between_batches_readers_get_in_and_writers_wait_for_them(
    path: Path,
) -> None:
    warehouse = DuckDBWarehouse(path, hold_connection=False)
    try:
        await warehouse.write([window("AAPL", 0)])
        assert _read_in_another_process(path) == (True, "1")
        reader = _hold(path, read_only=True)
        try:
            with pytest.raises(WarehouseUnavailable):
                await warehouse.write([window("AAPL", 1)])
        finally:
            _release(reader)
        assert await warehouse.write([window("AAPL", 1)]) == []
        assert _read_in_another_process(path) == (True, "2")
    finally:
        await warehouse.close()


def test_duckdb_path_follows_the_data_dir_unless_set(tmp_path: Path) -> None:
    base = {"STOCKSTREAM_DATA_DIR": str(tmp_path / "d")}
    settings = load_settings(environ=base, dotenv_path=None, config_dir=tmp_path)
    assert duckdb_path(settings) == tmp_path / "d" / "warehouse.duckdb"
    explicit = load_settings(
        environ={**base, "DUCKDB_PATH": str(tmp_path / "w.duckdb")},
        dotenv_path=None,
        config_dir=tmp_path,
    )
    assert duckdb_path(explicit) == tmp_path / "w.duckdb"
    warehouse = from_settings(settings)
    assert isinstance(warehouse, DuckDBWarehouse)
    assert warehouse.path == tmp_path / "d" / "warehouse.duckdb"


def test_insert_id_is_symbol_and_window_start() -> None:
    assert insert_id("AAPL", T0) == "AAPL|2026-01-05T14:30:00.000Z"
    assert Rejected(1, "x") == Rejected(1, "x")
