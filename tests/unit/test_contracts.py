"""Validation of stock-quotes records and the dead-letter envelope."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    assert orjson.loads(quote.to_json()) == {**good(), "current_price": 189.5, "conditions": None}


# Symbols as Finnhub spells them (stocks, foreign listings, indices, forex, crypto).
FINNHUB_SYMBOLS = [
    "AAPL",
    "BRK.B",
    "0700.HK",
    "7203.T",
    "SBIN.NS",
    "^GSPC",
    "OANDA:EUR_USD",
    "OANDA:XAU_USD",
    "FXCM:XAU/USD",
    "IC MARKETS:1",
    "BINANCE:BTCUSDT",
    "BINANCE:1000SHIBUSDT",
    "COINBASE:BTC-USD",
    "HUOBI:btcusdt",
]


@pytest.mark.parametrize("symbol", FINNHUB_SYMBOLS)
def test_every_finnhub_symbol_format_is_accepted(symbol: str) -> None:
    quote = parse(good(symbol=symbol), key=symbol.encode())
    assert quote.symbol == symbol


def test_trade_conditions_are_carried() -> None:
    quote = parse(good(conditions=["1", "12"]))
    assert quote.conditions == ("1", "12")
    assert orjson.loads(quote.to_json())["conditions"] == ["1", "12"]
    assert parse(good(conditions=None)).conditions is None


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
        ({"symbol": "-AAPL"}, "symbol format"),
        ({"symbol": "ÄPPLE"}, "symbol format"),
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


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"current_price": 1e200, "volume": 1e200}, "current_price must be in"),
        ({"volume": 1e200}, "volume must be in"),
        ({"current_price": 10**400}, "current_price is out of range"),
        ({"fetched_at": 2**64 - 1}, "fetched_at=18446744073709551615 is after the year 9999"),
        ({"fetched_at": 1e300}, "is after the year 9999"),
        ({"day_high": 1e13, "day_low": 1.0}, "day_high must be in"),
        ({"change_percent": -1e10}, "change_percent must be in"),
        ({"symbol": "AAPL\n"}, "printable"),
        ({"symbol": " AAPL"}, "does not match the symbol format"),
        ({"symbol": "AAPL "}, "does not match the symbol format"),
        ({"conditions": "1,12"}, "conditions must be a list"),
        ({"conditions": ["1"] * 17}, "conditions must be a list of at most 16"),
        ({"conditions": [""]}, "each code must be 1 to 8"),
        ({"conditions": ["123456789"]}, "each code must be 1 to 8"),
        ({"conditions": ["\x07"]}, "each code must be 1 to 8"),
        ({"symbol": "A" * 65}, "symbol must be 1 to 64 printable characters"),
        ({"symbol": "AA\x00PL"}, "printable"),
        ({"symbol": ""}, "printable"),
    ],
)
def test_every_field_is_bounded_not_only_typed(overrides: dict[str, object], needle: str) -> None:
    symbol = overrides.get("symbol", "AAPL")
    key = symbol.encode() if isinstance(symbol, str) else b"AAPL"
    with pytest.raises(ContractError) as info:
        V.validate(key, good(**overrides), NOW)
    assert info.value.reason is Reason.INVALID
    assert needle in info.value.error


def test_the_largest_valid_quote_still_sums_to_finite_numbers() -> None:
    quote = V.validate(b"AAPL", good(current_price=1e12, volume=1e15), NOW)
    # What a window accumulates, many times over, stays finite (JSON cannot carry inf).
    assert math.isfinite(quote.current_price * quote.volume * 1e9)  # type: ignore[operator]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "symbol",
        "current_price",
        "market_timestamp",
        "source",
        "volume",
        "fetched_at",
        "change_amount",
        "change_percent",
        "day_high",
        "day_low",
        "day_open",
        "prev_close",
    ]
)


@pytest.mark.parametrize("container", [[], {}, [1], {"a": 1}])
@pytest.mark.parametrize("name", sorted(good()))
def test_a_list_or_object_in_any_field_is_a_contract_error(name: str, container: object) -> None:
    # Found by the hypothesis test below in CI: `source: []` raised TypeError (unhashable).
    with pytest.raises(ContractError) as info:
        parse(good(**{name: container}))
    assert info.value.reason is Reason.INVALID


@given(
    st.dictionaries(fields, json_values, max_size=12),
    st.none() | st.binary(max_size=12) | st.just(b"AAPL"),
)
def test_any_json_object_is_a_bounded_quote_or_a_contract_error(
    record: dict[str, object], key: bytes | None
) -> None:
    base = good()
    base.update(record)
    try:
        quote = V.parse(key, orjson.dumps(base, option=orjson.OPT_NON_STR_KEYS), NOW)
    except ContractError as exc:
        assert exc.reason in (Reason.INVALID, Reason.MALFORMED) and exc.error
        return
    assert 0 < quote.current_price <= 1e12
    assert quote.volume is None or 0 <= quote.volume <= 1e15
    assert 100_000_000_000 <= quote.market_timestamp <= NOW + 300_000
    assert quote.fetched_at is None or quote.fetched_at <= 253_402_300_800_000


@given(st.binary(max_size=300), st.none() | st.binary(max_size=20))
def test_any_bytes_are_a_quote_or_a_contract_error(value: bytes, key: bytes | None) -> None:
    try:
        V.parse(key, value, NOW)
    except ContractError as exc:
        assert exc.reason in (Reason.INVALID, Reason.MALFORMED)


@given(st.dictionaries(fields, st.integers() | st.floats() | st.text(max_size=5), max_size=12))
def test_any_python_values_validate_or_raise_a_contract_error(record: dict[str, object]) -> None:
    # The replay source hands parsed rows (arbitrary Python ints included) to `validate`.
    base = good()
    base.update(record)
    try:
        V.validate(b"AAPL", base, NOW)
    except ContractError as exc:
        assert exc.reason is Reason.INVALID
