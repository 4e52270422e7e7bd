"""The `stock-anomalies` contract: one window whose one-minute return or volume is far from its
symbol's recent history.

The record key is the symbol; the value a UTF-8 JSON object with the fields of `FIELDS`, in
that order. An anomaly is identified by `(symbol, window_start_ms, kind)`: the detector emits
each at most once (also across restarts), and its consumers may deduplicate on it.

Written by agents/anomaly/ (the rules: its statistics.py and the README, "Real-time
anomalies"): output partition p carries the anomalies of `stock-quotes-aggregated` partition p,
and the Kafka timestamp is the emit time (event time is in the payload).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from stockstream.contracts.timestamps import MAX_EPOCH_MS, iso_utc
from stockstream.errors import StockstreamError


class AnomalyKind(StrEnum):
    RETURN = "return"  # close / previous window's close - 1
    VOLUME = "volume"  # the window's volume


#: (name, meaning), in record order.
FIELDS: tuple[tuple[str, str], ...] = (
    ("symbol", "Ticker symbol (the Kafka key)"),
    ("window_start", "Start of the window, ISO-8601 UTC"),
    ("window_end", "End of the window, ISO-8601 UTC"),
    ("window_start_ms", "window_start as epoch milliseconds"),
    ("kind", "`return` or `volume`"),
    ("value", "The window's one-minute return (fraction) or volume"),
    ("mean", "Mean of that value over the symbol's history"),
    ("stddev", "Its standard deviation over the history (> 0)"),
    ("z", "(value - mean) / stddev"),
    ("threshold", "ANOMALY_Z_THRESHOLD when detected"),
    ("history", "Number of windows in the history"),
    ("close", "The window's close price"),
    ("volume", "The window's volume, null when it has none"),
    ("detected_at", "When the detector emitted it, ISO-8601 UTC"),
)
NAMES = tuple(name for name, _ in FIELDS)
_NUMBERS = ("value", "mean", "stddev", "z", "threshold", "close")


class AnomalyRecordError(StockstreamError, ValueError):
    """A record that is not a valid anomaly; the message starts with the field's name."""


def anomaly_record(
    *,
    symbol: str,
    start_ms: int,
    end_ms: int,
    kind: AnomalyKind,
    value: float,
    mean: float,
    stddev: float,
    threshold: float,
    history: int,
    close: float,
    volume: float | None,
    detected_at_ms: int,
) -> dict[str, Any]:
    """The record of one anomaly (`z` derived here, once)."""
    return {
        "symbol": symbol,
        "window_start": iso_utc(start_ms),
        "window_end": iso_utc(end_ms),
        "window_start_ms": start_ms,
        "kind": kind.value,
        "value": value,
        "mean": mean,
        "stddev": stddev,
        "z": (value - mean) / stddev,
        "threshold": threshold,
        "history": history,
        "close": close,
        "volume": volume,
        "detected_at": iso_utc(detected_at_ms),
    }


def anomaly_identity(record: Mapping[str, Any]) -> tuple[str, int, str]:
    """`(symbol, window_start_ms, kind)`: what identifies an anomaly."""
    return str(record["symbol"]), int(record["window_start_ms"]), str(record["kind"])


def _finite(record: Mapping[str, Any], name: str) -> float:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AnomalyRecordError(f"{name}: expected a finite number, got {value!r:.40}")
    return float(value)


def parse_anomaly(record: Any) -> dict[str, Any]:
    """Every field checked, in `FIELDS` order; raises `AnomalyRecordError` naming the first
    field that breaks the contract (consumers dead-letter such a record)."""
    if not isinstance(record, Mapping):
        raise AnomalyRecordError(f"expected a JSON object, got {type(record).__name__}")
    symbol = record.get("symbol")
    if not isinstance(symbol, str) or not 0 < len(symbol) <= 64:
        raise AnomalyRecordError("symbol: missing or not a string of 1 to 64 characters")
    start = record.get("window_start_ms")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < MAX_EPOCH_MS:
        raise AnomalyRecordError(f"window_start_ms: not epoch milliseconds: {start!r:.40}")
    kind = record.get("kind")
    if kind not in {k.value for k in AnomalyKind}:
        raise AnomalyRecordError(f"kind: expected return or volume, got {kind!r:.40}")
    for name in ("window_start", "window_end", "detected_at"):
        if not isinstance(record.get(name), str):
            raise AnomalyRecordError(f"{name}: expected an ISO-8601 UTC timestamp")
    row: dict[str, Any] = {name: record.get(name) for name in NAMES}
    for name in _NUMBERS:
        row[name] = _finite(record, name)
    if row["stddev"] <= 0:
        raise AnomalyRecordError("stddev: must be > 0")
    history = record.get("history")
    if isinstance(history, bool) or not isinstance(history, int) or history < 2:
        raise AnomalyRecordError(f"history: expected an integer >= 2, got {history!r:.40}")
    if row["volume"] is not None:
        row["volume"] = _finite(record, "volume")
    return row
