"""A deterministic intraday random walk: realistic-looking quotes without an API key.

Same seed, same quotes: the quick start, the tests and the benchmarks all rely on that.
Prices follow a geometric random walk per symbol (per-symbol volatility), volumes are
log-normal, and event time advances by 1/rate seconds per quote across all symbols.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from stockstream.contracts.quotes import Quote, Source

_WELL_KNOWN = (
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "AVGO", "JPM", "V",
    "WMT", "XOM", "UNH", "MA", "PG", "JNJ", "HD", "COST", "ORCL", "BAC",
)  # fmt: skip


def symbols_for(count: int) -> list[str]:
    if count <= len(_WELL_KNOWN):
        return list(_WELL_KNOWN[:count])
    return list(_WELL_KNOWN) + [f"SIM{i:04d}" for i in range(count - len(_WELL_KNOWN))]


@dataclass
class _Walk:
    symbol: str
    price: float
    open: float
    high: float
    low: float
    prev_close: float
    sigma: float


class Simulator:
    def __init__(self, symbols: int, seed: int, rate: float, start_ms: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._step_ms = 1000.0 / rate
        self._now_ms = float(start_ms if start_ms is not None else int(time.time() * 1000))
        self._walks = []
        for symbol in symbols_for(symbols):
            price = round(self._rng.uniform(20, 600), 2)
            prev = round(price * math.exp(self._rng.gauss(0, 0.01)), 2)
            self._walks.append(
                _Walk(symbol, price, price, price, price, prev, self._rng.uniform(0.0002, 0.002))
            )

    @property
    def symbols(self) -> list[str]:
        return [w.symbol for w in self._walks]

    def quotes(self, count: int | None = None) -> Iterator[Quote]:
        """`count` quotes (forever if None), round-robin-ish over symbols in random order."""
        produced = 0
        rng = self._rng
        while count is None or produced < count:
            walk = self._walks[rng.randrange(len(self._walks))]
            walk.price = max(0.01, round(walk.price * math.exp(rng.gauss(0, walk.sigma)), 2))
            walk.high, walk.low = max(walk.high, walk.price), min(walk.low, walk.price)
            self._now_ms += self._step_ms
            ts = int(self._now_ms)
            change = round(walk.price - walk.prev_close, 4)
            yield Quote(
                symbol=walk.symbol,
                current_price=walk.price,
                market_timestamp=ts,
                source=Source.SIMULATOR.value,
                volume=float(max(1, int(rng.lognormvariate(4.0, 1.0)))),
                fetched_at=ts,
                change_amount=change,
                change_percent=round(100 * change / walk.prev_close, 4),
                day_high=walk.high,
                day_low=walk.low,
                day_open=walk.open,
                prev_close=walk.prev_close,
            )
            produced += 1


class SimulatorSource:
    """The simulator as an async source: paced so event time follows the wall clock (a live
    feed), or as fast as possible (`paced=False`) for bursts and benchmarks."""

    def __init__(self, simulator: Simulator, *, count: int | None, paced: bool) -> None:
        self._simulator = simulator
        self._count = count
        self._paced = paced

    async def quotes(self) -> AsyncIterator[Quote]:
        for n, quote in enumerate(self._simulator.quotes(self._count)):
            if self._paced:
                delay = quote.market_timestamp / 1000 - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif n % 1000 == 0:
                await asyncio.sleep(0)  # let signal handlers and the producer run
            yield quote
