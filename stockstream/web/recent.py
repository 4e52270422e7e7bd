"""The last closed windows of each symbol, kept in memory for the web view.

Why a ring fed by the emitter rather than reading the output partition back per request:
the worker keeps no closed window, and a read-back (kafka/readback.py) per page view would open
a Kafka consumer per HTTP request and scan a partition whose other symbols may push the windows
of the asked one arbitrarily far back -- unbounded work any visitor could trigger. The emitter
already knows every window the moment it is in `stock-quotes-aggregated`
(`WindowEmitter.listeners`), so keeping the last few per symbol costs O(1) per window and answers
from memory.

The price, shown in every answer as `history_since`: the history starts when this worker
first emitted for the partition (after a restart or a rebalance the new owner starts afresh;
the topic and the warehouse hold the full history). Memory is bounded twice: at most
`MAX_PER_SYMBOL` windows per symbol and `MAX_WINDOWS` in all, the symbol that emitted least
recently giving up its oldest window first. The windows are the closed `WindowAggregate`s
themselves (never changed after their close), turned into records only when asked for.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stockstream.tables.windows import WindowAggregate

#: The most closed windows one symbol keeps (and the bound of `?last=`).
MAX_PER_SYMBOL = 500
#: The most closed windows kept in all (a few hundred bytes each).
MAX_WINDOWS = 100_000


@dataclass
class _Symbol:
    partition: int
    windows: deque[WindowAggregate]


class RecentWindows:
    """Per symbol, the most recently closed windows this worker emitted."""

    def __init__(self, per_symbol: int = MAX_PER_SYMBOL, total: int = MAX_WINDOWS) -> None:
        self._per_symbol = per_symbol
        self._total = total
        self._count = 0
        # Least recently emitted symbol first: it gives up windows when the total is reached.
        self._symbols: OrderedDict[str, _Symbol] = OrderedDict()
        self._since: dict[int, float] = {}
        self._last_offset: dict[int, int] = {}

    def record(self, partition: int, windows: Sequence[WindowAggregate], highest: int) -> None:
        """An `EmitListener`: `windows` of `partition` are in the output topic."""
        self._since.setdefault(partition, time.time())
        self._last_offset[partition] = max(self._last_offset.get(partition, -1), highest)
        for window in windows:
            entry = self._symbols.get(window.symbol)
            if entry is None or entry.partition != partition:
                if entry is not None:
                    self._count -= len(entry.windows)
                entry = self._symbols[window.symbol] = _Symbol(
                    partition, deque(maxlen=self._per_symbol)
                )
            self._symbols.move_to_end(window.symbol)
            if len(entry.windows) == entry.windows.maxlen:
                self._count -= 1  # the append below pushes the oldest out
            entry.windows.append(window)
            self._count += 1
            self._evict()

    def _evict(self) -> None:
        while self._count > self._total:
            symbol, entry = next(iter(self._symbols.items()))
            entry.windows.popleft()
            self._count -= 1
            if not entry.windows:
                del self._symbols[symbol]

    def last(self, symbol: str, n: int) -> list[WindowAggregate]:
        """Up to `n` most recent closed windows of `symbol`, newest first."""
        entry = self._symbols.get(symbol)
        if entry is None or n <= 0:
            return []
        newest = list(entry.windows)[-n:]
        newest.reverse()
        return newest

    def symbols(self, partition: int) -> list[str]:
        """Symbols of `partition` with recent closed windows."""
        return [s for s, entry in self._symbols.items() if entry.partition == partition]

    def since(self, partition: int) -> float | None:
        """Unix time this worker started keeping `partition`'s windows (None: not yet)."""
        return self._since.get(partition)

    def last_offset(self, partition: int) -> int | None:
        """The highest output offset an emit of `partition` reported (None: none yet)."""
        return self._last_offset.get(partition)

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions this worker no longer owns: their next owner answers for them."""
        gone = set(partitions)
        for partition in gone:
            self._since.pop(partition, None)
            self._last_offset.pop(partition, None)
        for symbol in [s for s, e in self._symbols.items() if e.partition in gone]:
            self._count -= len(self._symbols.pop(symbol).windows)

    def __len__(self) -> int:
        return self._count
