"""The forming candles of a symbol: its open windows, from this worker's window state when it
holds the symbol's partition, else from the worker that does (its `/chart/forming` page, found
through Faust's table metadata by the `owner` function the chart passes in).

Another worker's answer is checked field by field like any input: a peer can be wrong too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import aiohttp
from aiokafka.partitioner import DefaultPartitioner

from stockstream.settings import Settings
from stockstream.tables.window_state import WindowState
from stockstream.web.candles import forming_candles

OWNER_TIMEOUT_SECONDS = 1.0

#: The URL of the worker that owns a source partition, None when unknown or this worker.
OwnerOf = Callable[[int], str | None]

_PARTITIONER = DefaultPartitioner()


def default_partition(symbol: str, partitions: int) -> int:
    """The partition the quote producer picks for `symbol` (aiokafka's murmur2, like Java's)."""
    every = list(range(max(partitions, 1)))
    return int(_PARTITIONER(symbol.encode(), every, every))


def remote_candles(body: Any) -> list[dict[str, Any]]:
    """The candles of another worker's `/chart/forming` answer, checked field by field."""
    if not isinstance(body, dict) or not isinstance(body.get("candles"), list):
        raise ValueError("not a forming-candles answer")
    out = []
    for item in body["candles"][:4]:
        if not isinstance(item, dict):
            raise ValueError("candle is not an object")
        bar: dict[str, Any] = {}
        for name in ("time", "start_ms", "count"):
            value = item.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: not a non-negative integer")
            bar[name] = value
        for name in ("open", "high", "low", "close", "volume"):
            value = item.get(name)
            if value is None and name == "volume":
                bar[name] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name}: not a number")
            if not math.isfinite(value):
                raise ValueError(f"{name}: not finite")
            bar[name] = float(value)
        out.append(bar)
    return out


class FormingCandles:
    """Forming candles by symbol; `partition_of` knows symbols seen in the output topic (whose
    partition p is source partition p), the others get the producer's partition."""

    def __init__(
        self,
        settings: Settings,
        state: WindowState,
        owner: OwnerOf,
        partition_of: Callable[[str], int | None],
    ) -> None:
        self._partitions = settings.kafka.partitions
        self._state = state
        self._owner = owner
        self._partition_of = partition_of
        self._http: aiohttp.ClientSession | None = None

    def local(self, symbol: str) -> dict[str, Any]:
        """The forming candles of `symbol` if this worker holds its partition."""
        partition = self._partition_of(symbol)
        if partition is None:
            partition = default_partition(symbol, self._partitions)
        windows = self._state.get(partition)
        candles = forming_candles(windows.open.values(), symbol) if windows is not None else []
        return {
            "symbol": symbol,
            "partition": partition,
            "held": windows is not None,
            "owner": None,
            "candles": candles,
        }

    async def fetch(self, symbol: str) -> dict[str, Any]:
        """`local`, or the owner's forming candles when another worker holds them."""
        body = self.local(symbol)
        if body["held"]:
            return body
        owner = self._owner(body["partition"])
        body["owner"] = owner
        if owner is None:
            return body
        try:
            if self._http is None:
                timeout = aiohttp.ClientTimeout(total=OWNER_TIMEOUT_SECONDS)
                self._http = aiohttp.ClientSession(timeout=timeout)
            url = f"{owner.rstrip('/')}/chart/forming"
            async with self._http.get(url, params={"symbol": symbol}) as response:
                response.raise_for_status()
                body["candles"] = remote_candles(await response.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            body["error"] = f"owner did not answer: {type(exc).__name__}"
        return body

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
