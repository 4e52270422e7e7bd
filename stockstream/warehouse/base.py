"""What the warehouse loader needs from a back-end, and what a back-end may answer.

`Warehouse.write(records)` returns only once the warehouse acknowledged every record it did not
reject; it raises `WarehouseUnavailable` when that is not (yet) possible, and the loader retries
the same records later (it commits the Kafka offsets only after `write` returned). A record the
warehouse refuses for good is returned as a `Rejected` with the reason, for the dead-letter
topic: retrying it would never succeed.

Back-ends: `duckdb_backend.py` (embedded, the default) and `bigquery_backend.py`; `backends.py`
builds the configured one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from stockstream.contracts.timestamps import iso_utc
from stockstream.contracts.windows import Kind
from stockstream.errors import StockstreamError
from stockstream.warehouse.schema import CONTRACT_COLUMNS

DEFAULT_TABLE = "aggregates_1m"
T = TypeVar("T")


class WarehouseUnavailable(StockstreamError):
    """Nothing (or not everything) could be written now; retry the same records later."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record the warehouse refused for good: `index` into the written records."""

    index: int
    error: str


class Warehouse(Protocol):
    """What the warehouse loader needs from a back-end."""

    #: Short name for logs and metrics: `duckdb` or `bigquery`.
    name: str

    async def write(self, records: Sequence[Mapping[str, Any]]) -> list[Rejected]:
        """Write the records (aggregated windows, as decoded JSON objects).

        Returns the records refused for good; every other record is durably stored when this
        returns. Raises `WarehouseUnavailable` on a transient failure (the caller retries the
        same records; writes are idempotent per `(symbol, window_start)`).
        """
        ...

    async def read(
        self, start_ms: int, end_ms: int, symbols: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        """The stored windows with `start_ms <= window_start < end_ms` (of `symbols` when
        given) as contract records (contracts/windows.py, without `ingested_at`), one per
        `(symbol, window_start)`: the latest `ingested_at` where a back-end keeps copies.
        Raises `WarehouseUnavailable` when the warehouse cannot be read now."""
        ...

    async def close(self) -> None:
        """Release connections and files (waits for a write in progress)."""
        ...


def record_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row read back as a window record: the contract's fields in order, timestamps
    (read as epoch milliseconds) as the contract's ISO-8601 UTC text."""
    return {
        c.name: iso_utc(row[c.name]) if c.kind is Kind.TIMESTAMP else row[c.name]
        for c in CONTRACT_COLUMNS
    }


def insert_id(symbol: str, window_start_ms: int) -> str:
    """The deterministic row id `symbol|window_start` (ISO-8601 UTC, milliseconds)."""
    return f"{symbol}|{iso_utc(window_start_ms)}"


class DedicatedThread:
    """Where a back-end's blocking client calls run: one thread of its own, so they never
    block the event loop the aggregation shares, and two batches never interleave."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        """Let the thread go once its current call returns (not waited for)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
