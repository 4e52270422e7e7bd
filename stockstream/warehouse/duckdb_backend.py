"""The embedded warehouse: one DuckDB file, one row per `(symbol, window_start)`.

Rows are upserted (`INSERT ... ON CONFLICT (symbol, window_start) DO UPDATE`), so a window
that is delivered again (Kafka is at-least-once, a re-read or re-emitted record) replaces its
row instead of adding one. Each batch is one transaction.

DuckDB allows one writing process per file and, while it holds the file, no other process may
open it, not even read-only (`Could not set lock on file ... Conflicting lock is held`). With
`hold_connection=True` (the default) the worker keeps the file open; with `False` it opens it
for each batch only, so other processes can read it between batches, and a batch that finds
the file locked by a reader waits (back-pressure, nothing is lost).

All DuckDB calls run on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from stockstream.contracts.windows import Kind, WindowRecordError, parse_window
from stockstream.warehouse.base import (
    DEFAULT_TABLE,
    DedicatedThread,
    Rejected,
    WarehouseUnavailable,
    record_from_row,
)
from stockstream.warehouse.schema import COLUMNS, CONTRACT_COLUMNS, KEY, Column, duckdb_type

log = logging.getLogger(__name__)

# A bad value or a broken constraint: the row is refused, retrying cannot help.
_ROW_ERRORS: tuple[type[Exception], ...] = (
    duckdb.ConstraintException,
    duckdb.ConversionException,
    duckdb.InvalidInputException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
)
_ARROW = {
    Kind.STRING: pa.string(),
    Kind.TIMESTAMP: pa.timestamp("ms"),
    Kind.INTEGER: pa.int64(),
    Kind.NUMBER: pa.float64(),
}
# The batch as Arrow arrays (naive UTC timestamps: the connection's time zone is UTC).
_ARROW_TYPES = [_ARROW[c.kind] for c in CONTRACT_COLUMNS]
_INGESTED_AT_TYPE = pa.timestamp("us")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ddl(column: Column) -> str:
    return f"{_q(column.name)} {duckdb_type(column)}"


def to_row(record: Any) -> tuple[Any, ...]:
    """A `stock-quotes-aggregated` record as a typed row (without `ingested_at`), or
    `WindowRecordError` naming the field that breaks the contract."""
    return tuple(parse_window(record).values())


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
        self._thread = DedicatedThread("duckdb-warehouse")
        columns = [c.name for c in COLUMNS]
        updates = ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in columns if c not in KEY)
        self._upsert = (
            f"INSERT INTO {_q(table)} ({', '.join(map(_q, columns))})"
            f" SELECT {', '.join(map(_q, columns))} FROM __warehouse_batch"
            f" ON CONFLICT ({', '.join(map(_q, KEY))}) DO UPDATE SET {updates}"
        )

    # -- the interface -------------------------------------------------------------------

    async def write(self, records: Sequence[Mapping[str, Any]]) -> list[Rejected]:
        return await self._thread.run(self._write, list(records))

    async def read(
        self, start_ms: int, end_ms: int, symbols: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        return await self._thread.run(self._read, start_ms, end_ms, symbols)

    async def close(self) -> None:
        await self._thread.run(self._disconnect)
        self._thread.shutdown()

    # -- on the DuckDB thread ------------------------------------------------------------

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = duckdb.connect(str(self.path))
            try:
                conn.execute("SET TimeZone = 'UTC'")
                if not self._created:
                    columns = ", ".join(map(_ddl, COLUMNS))
                    conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {_q(self.table)}"
                        f" ({columns}, PRIMARY KEY ({', '.join(map(_q, KEY))}))"
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
            except WindowRecordError as exc:
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

    def _read(
        self, start_ms: int, end_ms: int, symbols: Collection[str] | None
    ) -> list[dict[str, Any]]:
        columns = ", ".join(
            f"epoch_ms({_q(c.name)}) AS {_q(c.name)}" if c.kind is Kind.TIMESTAMP else _q(c.name)
            for c in CONTRACT_COLUMNS
        )
        query = (
            f"SELECT {columns} FROM {_q(self.table)}"
            " WHERE window_start >= make_timestamp(?::BIGINT * 1000)"
            " AND window_start < make_timestamp(?::BIGINT * 1000)"
        )
        params: list[Any] = [start_ms, end_ms]
        if symbols is not None:
            query += " AND list_contains(?::VARCHAR[], symbol)"
            params.append(sorted(symbols))
        query += " ORDER BY window_start, symbol"
        try:
            conn = self._connect()
            try:
                cursor = conn.execute(query, params)
                names = [d[0] for d in cursor.description or ()]
                found = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
            finally:
                if not self.hold_connection:
                    self._drop_connection(checkpoint=True)
        except duckdb.Error as exc:
            self._drop_connection()
            raise WarehouseUnavailable(f"duckdb {self.path}: {exc}") from exc
        return [record_from_row(row) for row in found]

    def _upsert_rows(self, conn: duckdb.DuckDBPyConnection, rows: list[tuple[Any, ...]]) -> None:
        ingested_at = datetime.now(UTC).replace(tzinfo=None)
        columns = list(zip(*rows, strict=True))
        arrays = [
            pa.array(values, type=arrow)
            for values, arrow in zip(columns, _ARROW_TYPES, strict=True)
        ]
        arrays.append(pa.array([ingested_at] * len(rows), type=_INGESTED_AT_TYPE))
        batch = pa.Table.from_arrays(arrays, names=[c.name for c in COLUMNS])
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
