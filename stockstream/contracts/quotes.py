"""The `stock-quotes` contract: one price observation (`Quote`), and the validation every
reader of the topic applies (`QuoteValidator`).

A value is a UTF-8 JSON object; the record key is the symbol. Nothing Faust specific (no
`__faust` blocks) is ever written, so any Kafka client can produce and consume the topic.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from math import isfinite as _isfinite
from typing import Any

import orjson

from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.timestamps import MAX_EPOCH_MS, MIN_EPOCH_MS
from stockstream.errors import StockstreamError
from stockstream.settings import QuoteSettings


class Source(StrEnum):
    FINNHUB_QUOTE = "finnhub-quote"
    FINNHUB_TRADE = "finnhub-trade"
    SIMULATOR = "simulator"
    REPLAY = "replay"


class ContractError(StockstreamError, ValueError):
    """A record that breaks the contract: `reason` is `malformed` or `invalid`."""

    def __init__(self, reason: Reason, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


# Every field is bounded, not only typed: a value that is valid JSON but absurd must be
# refused here, before it reaches a sum (1e200 * 1e200 is inf, which JSON cannot carry), a
# Parquet timestamp or a warehouse column. The bounds are far beyond any real instrument.
#: Prices (and the day's prices): at most 1e12 in the quote currency.
MAX_PRICE = 1e12
#: Volumes (shares, contracts or coins): at most 1e15 per quote.
MAX_VOLUME = 1e15
#: `change_percent`: at most 1e9 %.
MAX_CHANGE_PERCENT = 1e9
#: Symbols are at most this long and printable, whatever QUOTE_SYMBOL_PATTERN allows.
SYMBOL_MAX_LENGTH = 64
#: Trade condition codes (Finnhub's `c`): at most this many per quote, each 1-8 characters.
MAX_CONDITIONS = 16
#: Accepted symbols a validator remembers (then it forgets them all and checks anew).
MAX_ACCEPTED_SYMBOLS = 65_536
CONDITION_MAX_LENGTH = 8

# (field, lowest, highest) of the optional numbers; `current_price` and `volume` are checked
# on their own (strict lower bounds).
OPTIONAL_NUMBERS = (
    ("change_amount", -MAX_PRICE, MAX_PRICE),
    ("change_percent", -MAX_CHANGE_PERCENT, MAX_CHANGE_PERCENT),
    ("day_high", -MAX_PRICE, MAX_PRICE),
    ("day_low", -MAX_PRICE, MAX_PRICE),
    ("day_open", -MAX_PRICE, MAX_PRICE),
    ("prev_close", -MAX_PRICE, MAX_PRICE),
)
_SOURCES = frozenset(s.value for s in Source)


@dataclass(frozen=True, slots=True)
class Quote:
    symbol: str
    current_price: float
    market_timestamp: int
    source: str
    volume: float | None = None
    fetched_at: int | None = None
    change_amount: float | None = None
    change_percent: float | None = None
    day_high: float | None = None
    day_low: float | None = None
    day_open: float | None = None
    prev_close: float | None = None
    # The trade's condition codes as the exchange feed reported them (Finnhub's `c`); None
    # when the source has none (REST quotes, crypto and forex trades).
    conditions: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        # orjson serialises dataclasses natively, field order kept: 10x faster than asdict.
        return orjson.dumps(self)


def _number(
    data: dict[str, Any], name: str, required: bool, low: float, high: float
) -> float | None:
    value = data.get(name)
    # The common case first, exactly what the checks below accept for a float (per quote).
    if type(value) is float and low <= value <= high and _isfinite(value):
        return value
    if value is None:
        if required:
            raise ContractError(Reason.INVALID, f"missing field {name!r}")
        return None
    # bool is an int subclass; a price of `true` is a producer bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(Reason.INVALID, f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise ContractError(Reason.INVALID, f"{name} is out of range") from None
    if not math.isfinite(number):
        raise ContractError(Reason.INVALID, f"{name} must be finite, got {value!r}")
    if not low <= number <= high:
        raise ContractError(Reason.INVALID, f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return number


def parse_conditions(data: dict[str, Any]) -> tuple[str, ...] | None:
    value = data.get("conditions")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_CONDITIONS:
        raise ContractError(
            Reason.INVALID, f"conditions must be a list of at most {MAX_CONDITIONS} codes"
        )
    for code in value:
        if (
            not isinstance(code, str)
            or not 0 < len(code) <= CONDITION_MAX_LENGTH
            or not code.isascii()
            or not code.isprintable()
        ):
            raise ContractError(
                Reason.INVALID,
                f"conditions: each code must be 1 to {CONDITION_MAX_LENGTH} printable ASCII"
                f" characters, got {str(code)[: CONDITION_MAX_LENGTH + 1]!r}",
            )
    return tuple(value)


def _epoch_ms(data: dict[str, Any], name: str, required: bool) -> int | None:
    value = data.get(name)
    if type(value) is int and MIN_EPOCH_MS <= value <= MAX_EPOCH_MS:  # the common case
        return value
    if value is None:
        if required:
            raise ContractError(Reason.INVALID, f"missing field {name!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ContractError(Reason.INVALID, f"{name} must be integer epoch milliseconds")
    if value < MIN_EPOCH_MS:
        raise ContractError(
            Reason.INVALID, f"{name}={value} is not epoch milliseconds (seconds given?)"
        )
    if value > MAX_EPOCH_MS:
        raise ContractError(Reason.INVALID, f"{name}={value} is after the year 9999")
    return int(value)


class QuoteValidator:
    """Turns raw `stock-quotes` bytes into a `Quote` or raises `ContractError`."""

    def __init__(self, symbol_pattern: str, max_future_ms: int) -> None:
        self._symbol = re.compile(symbol_pattern)
        self._max_future_ms = max_future_ms
        # Symbols already accepted, with the record key each must come with: the checks
        # (length, printable, the pattern) ran once per quote before. Bounded: hostile input
        # can send a new valid symbol per record.
        self._accepted: dict[str, bytes] = {}

    @classmethod
    def from_settings(cls, settings: QuoteSettings) -> QuoteValidator:
        """The validator every reader of `stock-quotes` uses (QUOTE_* settings)."""
        return cls(settings.symbol_pattern, int(settings.max_future_seconds * 1000))

    def parse(self, key: bytes | None, value: bytes | None, now_ms: int) -> Quote:
        if value is None:
            raise ContractError(Reason.MALFORMED, "empty value (tombstone)")
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ContractError(Reason.MALFORMED, f"not UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ContractError(
                Reason.MALFORMED, f"expected a JSON object, got {type(data).__name__}"
            )
        return self.validate(key, data, now_ms)

    def check_symbol(self, symbol: Any) -> str:
        """`symbol` if this contract accepts it; else `ContractError` saying why. Producers
        check their configured symbols with it before they send anything."""
        if not isinstance(symbol, str):
            raise ContractError(Reason.INVALID, "missing or non-string field 'symbol'")
        if not 0 < len(symbol) <= SYMBOL_MAX_LENGTH or not symbol.isprintable():
            raise ContractError(
                Reason.INVALID,
                f"symbol must be 1 to {SYMBOL_MAX_LENGTH} printable characters,"
                f" got {symbol[:SYMBOL_MAX_LENGTH]!r}",
            )
        # fullmatch: with `match`, `$` accepts a trailing newline ("AAPL\n").
        if not self._symbol.fullmatch(symbol):
            raise ContractError(
                Reason.INVALID,
                f"symbol {symbol!r} does not match the symbol format (QUOTE_SYMBOL_PATTERN)",
            )
        return symbol

    def _accepted_symbol(self, symbol: Any) -> tuple[str, bytes]:
        if type(symbol) is str:
            encoded = self._accepted.get(symbol)
            if encoded is not None:
                return symbol, encoded
        symbol = self.check_symbol(symbol)
        if len(self._accepted) >= MAX_ACCEPTED_SYMBOLS:
            self._accepted.clear()
        encoded = self._accepted[symbol] = symbol.encode()
        return symbol, encoded

    def validate(self, key: bytes | None, data: dict[str, Any], now_ms: int) -> Quote:
        symbol, encoded = self._accepted_symbol(data.get("symbol"))
        # Windows are per partition: a record keyed differently lands on another partition
        # than its symbol's other quotes and would split that symbol's windows.
        if key is None or key != encoded:
            shown = None if key is None else key.decode("utf-8", "replace")
            raise ContractError(
                Reason.INVALID, f"record key {shown!r} must equal symbol {symbol!r}"
            )
        price = _number(data, "current_price", required=True, low=-math.inf, high=MAX_PRICE)
        assert price is not None
        if price <= 0:
            raise ContractError(Reason.INVALID, f"current_price must be > 0, got {price!r}")
        ts = _epoch_ms(data, "market_timestamp", required=True)
        assert ts is not None
        if ts > now_ms + self._max_future_ms:
            raise ContractError(
                Reason.INVALID,
                f"market_timestamp {ts} is {(ts - now_ms) / 1000:.0f}s in the future",
            )
        source = data.get("source")
        # A JSON list or object is unhashable: test the type before the set lookup.
        if not isinstance(source, str) or source not in _SOURCES:
            raise ContractError(
                Reason.INVALID, f"source must be one of {sorted(_SOURCES)}, got {source!r}"
            )
        volume = _number(data, "volume", required=False, low=-math.inf, high=MAX_VOLUME)
        if volume is not None and volume < 0:
            raise ContractError(Reason.INVALID, f"volume must be >= 0, got {volume!r}")
        extra = {
            name: _number(data, name, required=False, low=low, high=high)
            for name, low, high in OPTIONAL_NUMBERS
        }
        high, low = extra["day_high"], extra["day_low"]
        if high is not None and low is not None and high < low:
            raise ContractError(Reason.INVALID, f"day_high {high} < day_low {low}")
        return Quote(
            symbol=symbol,
            current_price=price,
            market_timestamp=ts,
            source=source,
            volume=volume,
            fetched_at=_epoch_ms(data, "fetched_at", required=False),
            **extra,
            conditions=parse_conditions(data),
        )
