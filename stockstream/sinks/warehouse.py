"""The warehouse: where every closed window of `stock-quotes-aggregated` is loaded.

One small interface, two back-ends:

- `duckdb` (default, sinks/duckdb_warehouse.py): an embedded file under the data folder; an
  upsert on `(symbol, window_start)`, so a replayed or re-emitted window never adds a row.
- `bigquery` (sinks/bigquery_warehouse.py): streaming inserts into a table partitioned by day
  on `window_start` and clustered by `symbol`, with the insert id `symbol|window_start`.
  BigQuery deduplicates insert ids only best effort (about a minute), so the models that read
  the table deduplicate on `(symbol, window_start)` (README, "Warehouse").

`Warehouse.write(records)` returns only once the warehouse acknowledged every record it did not
reject; it raises `WarehouseUnavailable` when that is not (yet) possible, and the caller retries
the same records later (agents/warehouse.py commits the Kafka offsets only after `write`
returned). A record the warehouse refuses for good is returned as a `Rejected` with the reason,
for the dead-letter topic: retrying it would never succeed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stockstream.contracts import iso_utc
from stockstream.settings import Settings, WarehouseSettings

#: The `stock-quotes-aggregated` fields stored, in table order, with their meaning in the
#: warehouse; `ingested_at` (when the row was written) follows them.
CONTRACT_COLUMNS = (
    "symbol",
    "window_start",
    "window_end",
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
NULLABLE_COLUMNS = frozenset({"volume", "vwap"})
DEFAULT_TABLE = "aggregates_1m"
_MAX_EPOCH_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z, beyond every warehouse TIMESTAMP


class WarehouseUnavailable(Exception):
    """Nothing (or not everything) could be written now; retry the same records later."""


class WarehouseConfigError(ValueError):
    """The warehouse settings cannot work; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record the warehouse refused for good: `index` into the written records."""

    index: int
    error: str


class RowError(ValueError):
    """A record that cannot become a warehouse row."""


class Warehouse(Protocol):
    """What the warehouse agent needs from a back-end."""

    #: Short name for logs and metrics: `duckdb` or `bigquery`.
    name: str

    async def write(self, records: Sequence[Mapping[str, Any]]) -> list[Rejected]:
        """Write the records (aggregated windows, as decoded JSON objects).

        Returns the records refused for good; every other record is durably stored when this
        returns. Raises `WarehouseUnavailable` on a transient failure (the caller retries the
        same records; writes are idempotent per `(symbol, window_start)`).
        """
        ...

    async def close(self) -> None:
        """Release connections and files (waits for a write in progress)."""
        ...


def row_key(record: Mapping[str, Any]) -> tuple[str, int]:
    """`(symbol, window_start_ms)`: the identity of a window row, checked."""
    symbol = record.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise RowError("symbol: missing or not a non-empty string")
    start = record.get("window_start_ms")
    if isinstance(start, bool) or not isinstance(start, int):
        raise RowError(f"window_start_ms: expected integer epoch milliseconds, got {start!r}")
    if not 0 <= start < _MAX_EPOCH_MS:
        raise RowError(f"window_start_ms: {start} is not a time between 1970 and 9999")
    return symbol, start


def insert_id(symbol: str, window_start_ms: int) -> str:
    """The deterministic row id `symbol|window_start` (ISO-8601 UTC, milliseconds)."""
    return f"{symbol}|{iso_utc(window_start_ms)}"


def duckdb_path(settings: Settings) -> Path:
    """`DUCKDB_PATH`; left at its default it follows `STOCKSTREAM_DATA_DIR`, so every data
    folder (each test, each deployment) has its own warehouse file."""
    configured = settings.warehouse.duckdb_path
    default = next(
        f.default for f in dataclasses.fields(WarehouseSettings) if f.name == "duckdb_path"
    )
    if configured is None or str(configured) in ("", str(default)):
        return settings.data_dir / "warehouse.duckdb"
    return Path(configured)


def from_settings(settings: Settings) -> Warehouse:
    """The configured back-end (not connected yet: the first write connects)."""
    ws = settings.warehouse
    if ws.backend == "duckdb":
        from stockstream.sinks.duckdb_warehouse import DuckDBWarehouse

        return DuckDBWarehouse(
            duckdb_path(settings),
            # Not a setting yet (see README, "Warehouse"): the worker keeps the file open.
            hold_connection=bool(getattr(ws, "duckdb_hold_connection", True)),
        )
    if ws.backend == "bigquery":
        from stockstream.sinks.bigquery_warehouse import BigQueryWarehouse

        if ws.bq_credentials_file is not None and not Path(ws.bq_credentials_file).is_file():
            raise WarehouseConfigError(
                f"BQ_CREDENTIALS_FILE: no such file {str(ws.bq_credentials_file)!r}"
            )
        if not ws.bq_dataset or not ws.bq_table:
            raise WarehouseConfigError("BQ_DATASET and BQ_TABLE must not be empty")
        return BigQueryWarehouse(
            project=ws.bq_project,
            dataset=ws.bq_dataset,
            table=ws.bq_table,
            location=ws.bq_location,
            credentials_file=ws.bq_credentials_file,
            api_endpoint=ws.bq_api_endpoint,
            retry_deadline_seconds=ws.retry_deadline_seconds,
        )
    raise WarehouseConfigError(f"WAREHOUSE_BACKEND: unknown back-end {ws.backend!r}")
