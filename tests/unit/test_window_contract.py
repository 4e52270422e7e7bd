"""The `stock-quotes-aggregated` and `stock-quotes-dlq` contracts: built once, checked by every
reader, and the warehouse tables derived from the window contract's fields."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockstream.contracts.dead_letters import (
    NotADeadLetter,
    Reason,
    dead_letter,
    original_bytes,
    parse_dead_letter,
)
from stockstream.contracts.timestamps import iso_utc
from stockstream.contracts.windows import (
    FIELDS,
    NAMES,
    WindowRecordError,
    parse_window,
    window_identity,
    window_record,
)
from stockstream.tables.emitted import EmittedIndex
from stockstream.tables.windows import WindowAggregate
from stockstream.warehouse import schema
from stockstream.warehouse.bigquery_backend import table_schema

T0 = 1_767_623_400_000


def record(**changes: Any) -> dict[str, Any]:
    built = window_record(
        symbol="AAPL",
        start_ms=T0,
        end_ms=T0 + 60_000,
        count=3,
        total=301.5,
        low=100.25,
        high=100.75,
        open_price=100.25,
        close_price=100.5,
        volume=30.0,
        price_volume=3016.5,
        first_event_ms=T0 + 1_000,
        last_event_ms=T0 + 59_000,
    )
    built.update(changes)
    return built


def test_record_has_the_contract_fields_in_order_with_derived_avg_and_vwap() -> None:
    built = record()
    assert tuple(built) == NAMES
    assert built["window_start"] == "2026-01-05T14:30:00.000Z"
    assert built["avg"] == 100.5 and built["vwap"] == pytest.approx(100.55)
    assert record(volume=None)["vwap"] is not None  # derived at build time, not on update
    assert window_record(**{**_args(), "volume": None})["vwap"] is None


def _args() -> dict[str, Any]:
    return {
        "symbol": "A",
        "start_ms": T0,
        "end_ms": T0 + 60_000,
        "count": 1,
        "total": 1.0,
        "low": 1.0,
        "high": 1.0,
        "open_price": 1.0,
        "close_price": 1.0,
        "volume": None,
        "price_volume": 0.0,
        "first_event_ms": T0,
        "last_event_ms": T0,
    }


def test_parse_types_every_field_and_keeps_the_order() -> None:
    row = parse_window(orjson.loads(orjson.dumps(record())))
    assert list(row) == list(NAMES)
    assert row["window_start"] == T0 and row["window_end"] == T0 + 60_000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"window_start": iso_utc(T0 + 60_000)}, "window_start: '2026-01-05T14:31:00.000Z' is not"),
        ({"window_start": "2026-01-05T14:30:00"}, "window_start: not an ISO-8601 UTC timestamp"),
        ({"count": 2**63}, "count: 9223372036854775808 does not fit a 64-bit integer"),
        ({"sum": float("inf")}, "sum: expected a finite number"),
        ({"symbol": ""}, "symbol: missing or not a non-empty string"),
        ({"window_start_ms": -1}, "window_start_ms: -1 is not a time between 1970 and 9999"),
        ({"window_start_ms": "0"}, "window_start_ms: expected integer epoch milliseconds"),
        ({"vwap": "x"}, "vwap: expected a number"),
    ],
)
def test_a_record_breaking_the_contract_names_the_field(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(WindowRecordError, match=message.replace("(", r"\(")):
        parse_window(record(**changes))


def test_identity_refuses_what_is_not_an_object() -> None:
    with pytest.raises(WindowRecordError, match="expected a JSON object, got list"):
        window_identity([])


def test_warehouse_tables_are_derived_from_the_contract() -> None:
    assert [c.name for c in schema.COLUMNS] == [*NAMES, "ingested_at"]
    nullable = {f.name for f in FIELDS if f.nullable}
    assert nullable == {"volume", "vwap"}
    bigquery = {f.name: (f.field_type, f.mode) for f in table_schema()}
    assert bigquery["window_start"] == ("TIMESTAMP", "REQUIRED")
    assert bigquery["count"] == ("INT64", "REQUIRED")
    assert bigquery["vwap"] == ("FLOAT64", "NULLABLE")
    assert bigquery["ingested_at"] == ("TIMESTAMP", "REQUIRED")
    assert [schema.duckdb_type(c) for c in schema.COLUMNS[:2]] == [
        "VARCHAR NOT NULL",
        "TIMESTAMP NOT NULL",
    ]


def test_emitted_index_recovers_windows_with_their_offsets_and_skips_strangers() -> None:
    index = EmittedIndex()
    values: list[tuple[int, bytes | None]] = [
        (10, orjson.dumps(record(window_start_ms=T0, window_start=iso_utc(T0)))),
        (11, orjson.dumps(record(window_start_ms=T0 + 60_000))),
        (12, None),  # a tombstone
        (13, b"{not json"),
        (14, orjson.dumps({"symbol": "AAPL"})),  # no window start
        (15, orjson.dumps(record(symbol="MSFT"))),
    ]
    index.recover("out", 0, values)

    def window(symbol: str, start: int) -> WindowAggregate:
        return WindowAggregate(
            symbol, start, 60_000, 1, 1, 1, 1, 1, start, 1, start, None, 0, 0, 0, 0
        )

    assert index.emitted(0, window("AAPL", T0 + 60_000))
    assert not index.emitted(0, window("AAPL", T0 + 120_000))
    assert index.emitted(0, window("MSFT", T0)) and not index.emitted(1, window("MSFT", T0))
    index.mark(0, window("AAPL", T0 + 120_000), 16)
    assert index.emitted(0, window("AAPL", T0 + 120_000))
    # A checkpoint of the first AAPL window: recorded up to it, not past MSFT's window (15),
    # which is still open and will close again; the checkpointed one leaves the index.
    still_open = {("MSFT", T0), ("AAPL", T0 + 60_000)}
    assert index.checkpointed(0, [window("AAPL", T0)], still_open, 5, 5) == 10
    assert not index.emitted(0, window("AAPL", T0))
    assert index.emitted(0, window("MSFT", T0))
    assert index.checkpointed(0, [window("AAPL", T0 + 60_000)], {("MSFT", T0)}, 10, 10) == 11
    assert index.checkpointed(0, [window("MSFT", T0)], set(), 11, 11) == 15
    index.forget([0])
    assert not index.emitted(0, window("AAPL", T0 + 120_000))


@given(
    key=st.none() | st.binary(max_size=64),
    value=st.none() | st.binary(max_size=256),
    offset=st.integers(min_value=0, max_value=2**62),
)
def test_dead_letters_round_trip_any_bytes(
    key: bytes | None, value: bytes | None, offset: int
) -> None:
    body = dead_letter(
        key=key,
        value=value,
        topic="stock-quotes",
        partition=2,
        offset=offset,
        reason=Reason.INVALID,
        error="why",
        failed_at_ms=T0,
    )
    parsed = parse_dead_letter(orjson.dumps(body))
    assert original_bytes(parsed) == (key, value)
    assert (parsed["partition"], parsed["offset"], parsed["reason"]) == (2, offset, "invalid")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "not a JSON object"),
        (b"[1]", "not a JSON object"),
        (b"{oops", "not JSON"),
        (b'{"key": null}', "missing field"),
    ],
)
def test_what_is_not_a_dead_letter_is_named(value: bytes | None, message: str) -> None:
    with pytest.raises(NotADeadLetter, match=message):
        parse_dead_letter(value)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["key", "key_base64", "value", "value_base64", "topic", "partition", "offset", "reason"]
        ),
        _json_values,
        max_size=8,
    )
)
def test_any_json_in_a_dead_letter_field_is_typed_or_refused(overrides: dict[str, Any]) -> None:
    # A dead-letter topic is writable by anyone with access; a re-drive reads these fields.
    body = dead_letter(
        key=b"AAPL",
        value=b"{}",
        topic="stock-quotes",
        partition=0,
        offset=7,
        reason=Reason.INVALID,
        error="why",
        failed_at_ms=T0,
    )
    body.update(overrides)
    try:
        parsed = parse_dead_letter(orjson.dumps(body))
        original_bytes(parsed)
    except NotADeadLetter:
        return
    assert isinstance(parsed["topic"], str) and isinstance(parsed["reason"], str)
    for name in ("partition", "offset"):
        assert type(parsed[name]) is int and parsed[name] >= 0


def test_an_undecodable_original_is_not_a_dead_letter() -> None:
    body = {"key": None, "key_base64": False, "value": "***", "value_base64": True}
    with pytest.raises(NotADeadLetter, match="undecodable original"):
        original_bytes(body)
