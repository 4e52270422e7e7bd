"""The `stock-quotes-aggregated` contract: one closed one-minute window of one symbol.

`FIELDS` is the one definition of the record's fields, their kinds, whether they may be null
and what they mean. The aggregation builds records with `window_record`; every reader checks
them with `window_identity` / `parse_window`; the warehouse derives its table schemas (DuckDB,
Arrow, BigQuery) from `FIELDS` (warehouse/schema.py), so a field is added in one place.

The record key is the symbol; values are UTF-8 JSON objects with the fields in this order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from stockstream.contracts.timestamps import MAX_EPOCH_MS, iso_utc, parse_iso
from stockstream.errors import StockstreamError


class Kind(StrEnum):
    STRING = "string"
    TIMESTAMP = "timestamp"  # ISO-8601 UTC text in the record
    INTEGER = "integer"  # 64-bit
    NUMBER = "number"  # finite double


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    nullable: bool
    description: str


FIELDS: tuple[Field, ...] = (
    Field("symbol", Kind.STRING, False, "Ticker symbol (the Kafka key)"),
    Field(
        "window_start",
        Kind.TIMESTAMP,
        False,
        "Window start, UTC; the window is [window_start, window_end)",
    ),
    Field("window_end", Kind.TIMESTAMP, False, "Window end, UTC"),
    Field("window_start_ms", Kind.INTEGER, False, "window_start as epoch milliseconds"),
    Field(
        "count",
        Kind.INTEGER,
        False,
        "Number of quotes that set prices (trades with an AGG_EXCLUDED_CONDITIONS code do not,"
        " unless the window has no other)",
    ),
    Field("sum", Kind.NUMBER, False, "Sum of current_price over those quotes"),
    Field("min", Kind.NUMBER, False, "Lowest price"),
    Field("max", Kind.NUMBER, False, "Highest price"),
    Field("avg", Kind.NUMBER, False, "Mean price (sum / count)"),
    Field("open", Kind.NUMBER, False, "First price by event time"),
    Field("close", Kind.NUMBER, False, "Last price by event time"),
    Field("volume", Kind.NUMBER, True, "Sum of volumes of all quotes; null when no quote had one"),
    Field("vwap", Kind.NUMBER, True, "Volume-weighted average price; null without volume"),
    Field("first_event_ms", Kind.INTEGER, False, "Earliest market_timestamp in the window (ms)"),
    Field("last_event_ms", Kind.INTEGER, False, "Latest market_timestamp in the window (ms)"),
)
NAMES = tuple(f.name for f in FIELDS)

_INT64 = (-(2**63), 2**63)


class WindowRecordError(StockstreamError, ValueError):
    """A record that is not a valid window; the message starts with the field's name."""


def window_record(
    *,
    symbol: str,
    start_ms: int,
    end_ms: int,
    count: int,
    total: float,
    low: float,
    high: float,
    open_price: float,
    close_price: float,
    volume: float | None,
    price_volume: float,
    priced_volume: float | None = None,
    first_event_ms: int,
    last_event_ms: int,
) -> dict[str, Any]:
    """The record of a closed window (`avg` and `vwap` derived here, once). `priced_volume`:
    the part of `volume` whose trades set prices (default: all of it)."""
    weighed = volume if priced_volume is None else priced_volume
    return {
        "symbol": symbol,
        "window_start": iso_utc(start_ms),
        "window_end": iso_utc(end_ms),
        "window_start_ms": start_ms,
        "count": count,
        "sum": total,
        "min": low,
        "max": high,
        "avg": total / count,
        "open": open_price,
        "close": close_price,
        "volume": volume,
        "vwap": price_volume / weighed if weighed else None,
        "first_event_ms": first_event_ms,
        "last_event_ms": last_event_ms,
    }


def window_identity(record: Any) -> tuple[str, int]:
    """`(symbol, window_start_ms)`: what identifies a window (one row, one output record)."""
    if not isinstance(record, Mapping):
        raise WindowRecordError(f"expected a JSON object, got {type(record).__name__}")
    symbol = record.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise WindowRecordError("symbol: missing or not a non-empty string")
    start = record.get("window_start_ms")
    if isinstance(start, bool) or not isinstance(start, int):
        raise WindowRecordError(
            f"window_start_ms: expected integer epoch milliseconds, got {start!r}"
        )
    if not 0 <= start < MAX_EPOCH_MS:
        raise WindowRecordError(f"window_start_ms: {start} is not a time between 1970 and 9999")
    return symbol, start


def _value(record: Mapping[str, Any], field: Field) -> Any:
    name, value = field.name, record.get(field.name)
    if value is None and field.nullable:
        return None
    if field.kind is Kind.INTEGER:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WindowRecordError(f"{name}: expected an integer, got {value!r}")
        if not _INT64[0] <= value < _INT64[1]:
            raise WindowRecordError(f"{name}: {value} does not fit a 64-bit integer")
        return value
    if field.kind is Kind.NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WindowRecordError(f"{name}: expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise WindowRecordError(f"{name}: expected a finite number, got {value!r}")
        return number
    if field.kind is Kind.TIMESTAMP:
        if not isinstance(value, str):
            raise WindowRecordError(f"{name}: expected an ISO-8601 UTC timestamp, got {value!r}")
        try:
            return parse_iso(value)
        except ValueError as exc:
            raise WindowRecordError(f"{name}: not an ISO-8601 UTC timestamp: {exc}") from None
    if not isinstance(value, str) or not value:
        raise WindowRecordError(f"{name}: missing or not a non-empty string")
    return value


def parse_window(record: Any) -> dict[str, Any]:
    """Every field checked and typed (timestamps as epoch ms), in `FIELDS` order; raises
    `WindowRecordError` naming the first field that breaks the contract."""
    symbol, start_ms = window_identity(record)
    row = {name: _value(record, field) for name, field in zip(NAMES, FIELDS, strict=True)}
    if row["window_start"] != start_ms:
        raise WindowRecordError(
            f"window_start: {record['window_start']!r} is not window_start_ms {start_ms}"
        )
    row["symbol"] = symbol
    return row
