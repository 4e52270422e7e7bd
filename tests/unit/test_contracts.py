"""Validation of stock-quotes records and the dead-letter envelope."""

from __future__ import annotations

import math

import orjson
import pytest

from stockstream.contracts.dead_letters import Reason, dead_letter, original_bytes
from stockstream.contracts.quotes import ContractError, Quote, QuoteValidator
from stockstream.settings import QuoteSettings

NOW = 1_764_000_000_000
V = QuoteValidator(QuoteSettings().symbol_pattern, max_future_ms=300_000)


def good(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "symbol": "AAPL",
        "current_price": 189.5,
        "market_timestamp": NOW - 1_000,
        "source": "finnhub-quote",
        "volume": None,
        "fetched_at": NOW,
        "change_amount": 1.5,
        "change_percent": 0.8,
        "day_high": 190.0,
        "day_low": 187.0,
        "day_open": 188.0,
        "prev_close": 188.0,
    }
    record.update(overrides)
    return record


def parse(record: object, key: bytes | None = b"AAPL") -> Quote:
    return V.parse(key, orjson.dumps(record), NOW)


def reason_of(record: object, key: bytes | None = b"AAPL", raw: bytes | None = None) -> Reason:
    with pytest.raises(ContractError) as info:
        if raw is not None:
            V.parse(key, raw, NOW)
        else:
            parse(record, key)
    return info.value.reason


def test_valid_quote_round_trips() -> None:
    quote = parse(good())
    assert quote.symbol == "AAPL" and quote.current_price == 189.5
    assert orjson.loads(quote.to_json()) == {**good(), "current_price": 189.5}


def test_optional_fields_may_be_absent() -> None:
    quote = parse(
        {"symbol": "MSFT", "current_price": 1, "market_timestamp": NOW, "source": "simulator"},
        key=b"MSFT",
    )
    assert quote.volume is None and quote.day_high is None and quote.fetched_at is None


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"\xff\xfe", b"[1, 2]", b'"AAPL"', b"{"],
)
def test_malformed(raw: bytes) -> None:
    assert reason_of(None, raw=raw) == Reason.MALFORMED


def test_tombstone_is_malformed() -> None:
    with pytest.raises(ContractError) as info:
        V.parse(b"AAPL", None, NOW)
    assert info.value.reason == Reason.MALFORMED


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"current_price": 0}, "current_price must be > 0"),
        ({"current_price": -1.0}, "current_price must be > 0"),
        ({"current_price": "189"}, "must be a number"),
        ({"current_price": True}, "must be a number"),
        ({"current_price": None}, "missing field 'current_price'"),
        ({"market_timestamp": NOW // 1000}, "seconds given"),
        ({"market_timestamp": NOW + 3_600_000}, "in the future"),
        ({"market_timestamp": 1.5e12 + 0.5}, "integer epoch milliseconds"),
        ({"symbol": "aapl"}, "symbol format"),
        ({"symbol": 5}, "symbol"),
        ({"source": "bloomberg"}, "source must be one of"),
        ({"day_high": 1.0, "day_low": 2.0}, "day_high 1.0 < day_low 2.0"),
        ({"volume": -5}, "volume must be >= 0"),
    ],
)
def test_invalid(overrides: dict[str, object], needle: str) -> None:
    symbol = overrides.get("symbol")
    key = symbol.encode() if isinstance(symbol, str) else b"AAPL"
    with pytest.raises(ContractError) as info:
        parse(good(**overrides), key=key)
    assert info.value.reason == Reason.INVALID
    assert needle in info.value.error


def test_non_finite_price_rejected() -> None:
    # JSON has no NaN, but Python's json module writes one; it must not reach a window.
    raw = b'{"symbol":"AAPL","current_price":NaN,"market_timestamp":%d,"source":"replay"}' % NOW
    assert reason_of(None, raw=raw) in (Reason.MALFORMED, Reason.INVALID)
    with pytest.raises(ContractError, match="finite"):
        V.validate(b"AAPL", {**good(), "current_price": math.inf}, NOW)


def test_key_must_equal_symbol() -> None:
    assert reason_of(good(), key=b"MSFT") == Reason.INVALID
    assert reason_of(good(), key=None) == Reason.INVALID


def test_dead_letter_keeps_original_bytes_text_or_base64() -> None:
    for key, value in [(b"AAPL", b'{"a":1}'), (b"\xff", b"\x00\xff\xfe"), (None, None)]:
        record = dead_letter(
            key=key,
            value=value,
            topic="stock-quotes",
            partition=2,
            offset=7,
            reason=Reason.MALFORMED,
            error="x",
            failed_at_ms=NOW,
        )
        assert orjson.loads(orjson.dumps(record)) == record
        assert original_bytes(record) == (key, value)
    record = dead_letter(
        key=b"\xff",
        value=b"ok",
        topic="t",
        partition=0,
        offset=1,
        reason=Reason.LATE,
        error="late",
        failed_at_ms=NOW,
    )
    assert record["key_base64"] is True and record["value_base64"] is False
    assert record["reason"] == "late" and record["failed_at"].endswith("Z")
