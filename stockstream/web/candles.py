"""What the live chart draws, as plain data: closed windows and open ones as candles, anomalies
as markers, and the bounded book of recent ones per symbol (filled by web/live.py).

Pure: no Kafka, no Faust, no I/O. Times are lightweight-charts' `UTCTimestamp`s (seconds);
`start_ms` is kept beside them because it is what identifies a window in every contract.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from stockstream.contracts.quotes import SYMBOL_MAX_LENGTH
from stockstream.tables.windows import WindowAggregate

#: Closed candles kept per symbol: four hours of one-minute windows.
HISTORY_CANDLES = 240
#: Anomalies kept per symbol (two kinds per window at most).
HISTORY_MARKERS = 2 * HISTORY_CANDLES
#: Symbols the book remembers; the least recently updated one goes first.
MAX_SYMBOLS = 2_000


def check_symbol(value: Any) -> str | None:
    """`value` if it can be a symbol (1 to 64 printable characters), else None."""
    if isinstance(value, str) and 0 < len(value) <= SYMBOL_MAX_LENGTH and value.isprintable():
        return value
    return None


def candle(row: Mapping[str, Any]) -> dict[str, Any]:
    """The candle of a window record (`parse_window`'s row, or `WindowAggregate.to_record`)."""
    start_ms = int(row["window_start_ms"])
    return {
        "time": start_ms // 1000,
        "start_ms": start_ms,
        "open": row["open"],
        "high": row["max"],
        "low": row["min"],
        "close": row["close"],
        "volume": row["volume"],
        "count": row["count"],
    }


def forming_candles(windows: Iterable[WindowAggregate], symbol: str) -> list[dict[str, Any]]:
    """Candles of `symbol`'s open windows, oldest first (two may be open within the grace)."""
    mine = sorted((w for w in windows if w.symbol == symbol), key=lambda w: w.start_ms)
    return [candle(w.to_record()) for w in mine]


def marker(row: Mapping[str, Any]) -> dict[str, Any]:
    """The marker of an anomaly record (`parse_anomaly`'s row)."""
    start_ms = int(row["window_start_ms"])
    return {
        "time": start_ms // 1000,
        "start_ms": start_ms,
        "kind": row["kind"],
        "value": row["value"],
        "z": row["z"],
        "threshold": row["threshold"],
    }


class _SymbolHistory:
    __slots__ = ("candles", "markers", "partition")

    def __init__(self, partition: int | None) -> None:
        self.candles: dict[int, dict[str, Any]] = {}
        self.markers: dict[tuple[int, str], dict[str, Any]] = {}
        self.partition = partition


class CandleBook:
    """The last `history` closed candles and anomalies of up to `max_symbols` symbols."""

    def __init__(
        self,
        history: int = HISTORY_CANDLES,
        markers: int = HISTORY_MARKERS,
        max_symbols: int = MAX_SYMBOLS,
    ) -> None:
        self._history = history
        self._markers = markers
        self._max_symbols = max_symbols
        self._symbols: OrderedDict[str, _SymbolHistory] = OrderedDict()

    def _entry(self, symbol: str, partition: int | None) -> _SymbolHistory:
        entry = self._symbols.get(symbol)
        if entry is None:
            entry = self._symbols[symbol] = _SymbolHistory(partition)
            if len(self._symbols) > self._max_symbols:
                self._symbols.popitem(last=False)
        else:
            self._symbols.move_to_end(symbol)
            if partition is not None:
                entry.partition = partition
        return entry

    def add_window(self, row: Mapping[str, Any], partition: int | None = None) -> dict[str, Any]:
        """Remember a closed window (`partition`: of the output topic, which is the source
        partition that holds the symbol's open windows) and return its candle."""
        entry = self._entry(row["symbol"], partition)
        bar = candle(row)
        entry.candles[bar["start_ms"]] = bar
        if len(entry.candles) > self._history:
            del entry.candles[min(entry.candles)]
        return bar

    def add_anomaly(self, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """Remember an anomaly; its marker, or None when it is known already (the detector
        may repeat one after a restart: `(symbol, window_start_ms, kind)` identifies it)."""
        entry = self._entry(row["symbol"], None)
        mark = marker(row)
        key = (mark["start_ms"], mark["kind"])
        if key in entry.markers:
            return None
        entry.markers[key] = mark
        if len(entry.markers) > self._markers:
            del entry.markers[min(entry.markers)]
        return mark

    def snapshot(self, symbol: str) -> dict[str, Any]:
        """The symbol's candles and markers, oldest first (markers of candles the book no
        longer holds are left out: the chart has no bar to put them on)."""
        entry = self._symbols.get(symbol)
        if entry is None:
            return {"symbol": symbol, "partition": None, "candles": [], "markers": []}
        candles = [entry.candles[start] for start in sorted(entry.candles)]
        oldest = candles[0]["start_ms"] if candles else None
        markers = [
            entry.markers[key]
            for key in sorted(entry.markers)
            if oldest is not None and key[0] >= oldest
        ]
        return {
            "symbol": symbol,
            "partition": entry.partition,
            "candles": candles,
            "markers": markers,
        }

    def partition_of(self, symbol: str) -> int | None:
        entry = self._symbols.get(symbol)
        return entry.partition if entry is not None else None

    def symbols(self) -> list[str]:
        return sorted(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)
