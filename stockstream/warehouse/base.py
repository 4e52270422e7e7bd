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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from stockstream.contracts.timestamps import iso_utc
from stockstream.errors import StockstreamError

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

    async def close(self) -> None:
        """Release connections and files (waits for a write in progress)."""
        ...


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
