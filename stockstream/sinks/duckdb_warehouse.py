"""The embedded warehouse: one DuckDB file, one row per `(symbol, window_start)`.

Rows are upserted (`INSERT ... ON CONFLICT (symbol, window_start) DO UPDATE`), so a window
that is delivered again (Kafka is at-least-once, a replay, a re-emitted record) replaces its
row instead of adding one. Each batch is one transaction.

DuckDB allows one writing process per file and, while it holds the file, no other process may
open it, not even read-only (`Could not set lock on file ... Conflicting lock is held`). With
`hold_connection=True` (the default) the worker keeps the file open; with `False` it opens it
for each batch only, so other processes can read it between batches, and a batch that finds
the file locked by a reader waits (back-pressure, nothing is lost).

All DuckDB calls run on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from stockstream.sinks.warehouse import (
    DEFAULT_TABLE,
    Rejected,
    RowError,
    WarehouseUnavailable,
    row_key,
)

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

# (column, DuckDB type, Arrow type); window_start/window_end/ingested_at are UTC TIMESTAMPs.
_SCHEMA: tuple[tuple[str, str, pa.DataType], ...] = (
    ("symbol", "VARCHAR NOT NULL", pa.string()),
    ("window_start", "TIMESTAMP NOT NULL", pa.timestamp("ms")),
    ("window_end", "TIMESTAMP NOT NULL", pa.timestamp("ms")),
    ("window_start_ms", "BIGINT NOT NULL", pa.int64()),
    ("count", "BIGINT NOT NULL", pa.int64()),
    ("sum", "DOUBLE NOT NULL", pa.float64()),
    ("min", "DOUBLE NOT NULL", pa.float64()),
    ("max", "DOUBLE NOT NULL", pa.float64()),
    ("avg", "DOUBLE NOT NULL", pa.float64()),
    ("open", "DOUBLE NOT NULL", pa.float64()),
    ("close", "DOUBLE NOT NULL", pa.float64()),
    ("volume", "DOUBLE", pa.float64()),
    ("vwap", "DOUBLE", pa.float64()),
    ("first_event_ms", "BIGINT NOT NULL", pa.int64()),
    ("last_event_ms", "BIGINT NOT NULL", pa.int64()),
    ("ingested_at", "TIMESTAMP NOT NULL", pa.timestamp("us")),
)
_KEY = ("symbol", "window_start")
_INTEGERS = ("count", "first_event_ms", "last_event_ms")
_NUMBERS = ("sum", "min", "max", "avg", "open", "close")
_OPTIONAL_NUMBERS = ("volume", "vwap")
# A bad value or a broken constraint: the row is refused, retrying cannot help.
_ROW_ERRORS: tuple[type[Exception], ...] = (
    duckdb.ConstraintException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _integer(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(f"{name}: expected an integer, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise RowError(f"{name}: {value} does not fit a BIGINT")
    return value


def _number(record: Mapping[str, Any], name: str, *, optional: bool = False) -> float | None:
    value = record.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(f"{name}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise RowError(f"{name}: expected a finite number, got {value!r}")
    return number


def _timestamp_ms(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if not isinstance(value, str):
        raise RowError(f"{name}: expected an ISO-8601 UTC timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise RowError(f"{name}: not an ISO-8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        raise RowError(f"{name}: timestamp without a time zone: {value!r}")
    return (parsed - _EPOCH) // _MS


def to_row(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """A `stock-quotes-aggregated` record as a typed row (without `ingested_at`), or
    `RowError` naming the field that breaks the contract."""
    if not isinstance(record, Mapping):
        raise RowError(f"expected a JSON object, got {type(record).__name__}")
    symbol, start_ms = row_key(record)
    values: dict[str, Any] = {
        "symbol": symbol,
        "window_start": start_ms,
        "window_end": _timestamp_ms(record, "window_end"),
        "window_start_ms": start_ms,
    }
    for name in _INTEGERS:
        values[name] = _integer(record, name)
    for name in _NUMBERS:
        values[name] = _number(record, name)
    for name in _OPTIONAL_NUMBERS:
        values[name] = _number(record, name, optional=True)
    return tuple(values[name] for name, _, _ in _SCHEMA[:-1])


class DuckDBWarehouse:
    """`Warehouse` on an embedded DuckDB file."""

    name = "duckdb"

    def __init__(
        self, path: Path | str, *, table: str = DEFAULT_TABLE, hold_connection: bool = True
    ) -> None:
        self.path = Path(path)
        self.table = table
        self.hold_connection = hold_connection
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._created = False
        self._pool: ThreadPoolExecutor | None = None
        columns = [name for name, _, _ in _SCHEMA]
        updates = ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in columns if c not in _KEY)
        self._upsert = (
            f"INSERT INTO {_q(table)} ({', '.join(map(_q, columns))})"
            f" SELECT {', '.join(map(_q, columns))} FROM __warehouse_batch"
            f" ON CONFLICT ({', '.join(map(_q, _KEY))}) DO UPDATE SET {updates}"
        )

    @property
    def _executor(self) -> ThreadPoolExecutor:
        # One thread: the work never runs on the event loop, and batches never interleave.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb-warehouse")
        return self._pool

    # -- the interface -------------------------------------------------------------------

    async def write(self, records: Sequence[Mapping[str, Any]]) -> list[Rejected]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._write, list(records))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._disconnect)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    # -- on the DuckDB thread ------------------------------------------------------------

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = duckdb.connect(str(self.path))
            try:
                conn.execute("SET TimeZone = 'UTC'")
                if not self._created:
                    columns = ", ".join(f"{_q(n)} {t}" for n, t, _ in _SCHEMA)
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {_q(self.table)}"
                        f" ({columns}, PRIMARY KEY ({', '.join(map(_q, _KEY))}))"
                    )
                    self._created = True
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.execute("CHECKPOINT")
            except duckdb.Error as exc:
                log.warning("duckdb checkpoint failed", extra={"error": repr(exc)})
            finally:
                conn.close()

    def _write(self, records: list[Mapping[str, Any]]) -> list[Rejected]:
        rejected: list[Rejected] = []
        # Last record wins per key, as in the table: the batch is one upsert.
        rows: dict[tuple[str, int], tuple[int, tuple[Any, ...]]] = {}
        for index, record in enumerate(records):
            try:
                row = to_row(record)
            except RowError as exc:
                rejected.append(Rejected(index, str(exc)))
                continue
            rows[(row[0], row[1])] = (index, row)
        if not rows:
            return rejected
        try:
            conn = self._connect()
            try:
                self._upsert_rows(conn, [row for _, row in rows.values()])
            except _ROW_ERRORS:
                # Find the offending rows: each row on its own.
                for index, row in rows.values():
                    try:
                        self._upsert_rows(conn, [row])
                    except _ROW_ERRORS as exc:
                        rejected.append(Rejected(index, f"duckdb: {exc}"))
        except duckdb.Error as exc:
            # I/O errors, a lock held by another process, a fatal error that invalidated the
            # database: reconnect on the next attempt.
            self._drop_connection()
            raise WarehouseUnavailable(f"duckdb {self.path}: {exc}") from exc
        finally:
            if not self.hold_connection:
                self._drop_connection(checkpoint=True)
        return sorted(rejected, key=lambda r: r.index)

    def _upsert_rows(self, conn: duckdb.DuckDBPyConnection, rows: list[tuple[Any, ...]]) -> None:
        ingested_at = datetime.now(UTC).replace(tzinfo=None)
        columns = list(zip(*rows, strict=True))
        arrays = [
            pa.array(values, type=arrow)
            for values, (_, _, arrow) in zip(columns, _SCHEMA[:-1], strict=True)
        ]
        arrays.append(pa.array([ingested_at] * len(rows), type=pa.timestamp("us")))
        batch = pa.Table.from_arrays(arrays, names=[name for name, _, _ in _SCHEMA])
        # Registered outside the transaction: an aborted transaction refuses even unregister().
        conn.register("__warehouse_batch", batch)
        try:
            conn.execute("BEGIN TRANSACTION")
            try:
                conn.execute(self._upsert)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    conn.execute("ROLLBACK")
                raise
        finally:
            with contextlib.suppress(duckdb.Error):
                conn.unregister("__warehouse_batch")

    def _drop_connection(self, checkpoint: bool = False) -> None:
        if self._conn is None:
            return
        if checkpoint:
            self._disconnect()
            return
        conn, self._conn = self._conn, None
        with contextlib.suppress(duckdb.Error):
            conn.close()
