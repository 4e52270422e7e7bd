"""The window table's record format: versioned, named fields, and the positional format of
stockstream 0.1 still read so a running deployment upgrades without losing open windows."""

from __future__ import annotations

import random
from typing import Any

import pytest
from faust.serializers import codecs
from hypothesis import given
from hypothesis import strategies as st

from stockstream.tables.state_codec import (
    VERSION,
    StateFormatError,
    decode_clock,
    decode_window,
    encode_clock,
    encode_window,
)
from stockstream.tables.windows import PartitionClock, WindowAggregate

T0 = 1_767_623_400_000

# What stockstream 0.1 wrote (WindowAggregate.to_state / PartitionClock.to_state), verbatim.
V0_WINDOW = [
    "AAPL",
    T0,
    60_000,
    3,
    301.5,
    100.25,
    100.75,
    100.25,
    T0 + 1_000,
    100.5,
    T0 + 59_000,
    30.0,
    3016.5,
    T0 + 1_000,
    T0 + 59_000,
    41,
]
V0_CLOCK = [T0 + 65_000, T0, 41, 7]


def test_version_0_positional_records_are_read() -> None:
    window = decode_window(V0_WINDOW)
    assert window == WindowAggregate(
        symbol="AAPL",
        start_ms=T0,
        size_ms=60_000,
        count=3,
        sum=301.5,
        min=100.25,
        max=100.75,
        open=100.25,
        open_ts=T0 + 1_000,
        close=100.5,
        close_ts=T0 + 59_000,
        volume=30.0,
        price_volume=3016.5,
        first_event_ms=T0 + 1_000,
        last_event_ms=T0 + 59_000,
        last_offset=41,
    )
    assert decode_clock(V0_CLOCK) == PartitionClock(
        watermark_ms=T0 + 65_000, closed_until_ms=T0, last_offset=41, emitted_offset=7
    )


def test_records_are_written_with_a_version_and_named_fields() -> None:
    record = encode_window(decode_window(V0_WINDOW))
    assert record["v"] == VERSION
    assert record["symbol"] == "AAPL" and record["last_offset"] == 41
    assert encode_clock(PartitionClock(1, 2, 3, 4, {"AAPL": 1}, {"AAPL": 0})) == {
        "v": VERSION,
        "watermark_ms": 1,
        "closed_until_ms": 2,
        "last_offset": 3,
        "emitted_offset": 4,
        "symbol_watermarks": {"AAPL": 1},
        "symbol_closed_until": {"AAPL": 0},
    }


def test_a_field_added_with_a_default_may_be_absent() -> None:
    # Clocks written before per-symbol progress existed (0.1 lists, early v1 records).
    clock = decode_clock({"v": VERSION, "watermark_ms": 5})
    assert clock == PartitionClock(watermark_ms=5)
    assert decode_clock(V0_CLOCK).symbol_watermarks == {}


def test_field_order_does_not_matter() -> None:
    record = encode_window(decode_window(V0_WINDOW))
    items = list(record.items())
    random.Random(3).shuffle(items)
    assert decode_window(dict(items)) == decode_window(V0_WINDOW)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({**encode_clock(PartitionClock()), "v": 2}, "version 2"),
        ({k: v for k, v in encode_clock(PartitionClock()).items() if k != "v"}, "version None"),
        ([1, 2, 3], "version-0 record has 4 fields"),
        ({**encode_clock(PartitionClock()), "extra": 1}, "unknown ['extra']"),
        ({"v": VERSION, "watermark_ms": "1"}, "watermark_ms has an invalid value '1'"),
        ({"v": VERSION, "symbol_watermarks": {"A": None}}, "symbol_watermarks has an invalid"),
        ({"v": VERSION, "last_offset": True}, "last_offset has an invalid value True"),
        ("c|0", "unexpected state str"),
        (None, "unexpected state NoneType"),
    ],
)
def test_unreadable_clock_records_are_refused_not_guessed(value: Any, message: str) -> None:
    with pytest.raises(StateFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_clock(value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # What an infinite sum becomes in JSON: refused when read, not a TypeError later.
        ({"sum": None}, "sum has an invalid value None"),
        ({"price_volume": "inf"}, "price_volume has an invalid value 'inf'"),
        ({"symbol": ""}, "symbol has an invalid value ''"),
        ({"count": 1.5}, "count has an invalid value 1.5"),
    ],
)
def test_unreadable_window_values_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(StateFormatError, match=message):
        decode_window({**encode_window(decode_window(V0_WINDOW)), **changes})
    required = {k: v for k, v in encode_window(decode_window(V0_WINDOW)).items() if k != "open"}
    with pytest.raises(StateFormatError, match=r"missing \['open'\]"):
        decode_window(required)


def test_a_window_from_a_newer_release_is_refused() -> None:
    with pytest.raises(StateFormatError, match="newer stockstream"):
        decode_window({**encode_window(decode_window(V0_WINDOW)), "v": VERSION + 1})


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
epoch_ms = st.integers(min_value=0, max_value=253_402_300_799_999)
offsets = st.integers(min_value=-1, max_value=2**63 - 1)
windows = st.builds(
    WindowAggregate,
    symbol=st.text(min_size=1, max_size=30),
    start_ms=epoch_ms,
    size_ms=st.integers(min_value=1, max_value=86_400_000),
    count=st.integers(min_value=1, max_value=2**62),
    sum=finite,
    min=finite,
    max=finite,
    open=finite,
    open_ts=epoch_ms,
    close=finite,
    close_ts=epoch_ms,
    volume=st.none() | finite,
    price_volume=finite,
    first_event_ms=epoch_ms,
    last_event_ms=epoch_ms,
    last_offset=offsets,
)
marks = st.dictionaries(st.text(min_size=1, max_size=8), epoch_ms, max_size=5)
clocks = st.builds(PartitionClock, offsets, offsets, offsets, offsets, marks, marks)


@given(windows, clocks)
def test_round_trip_through_the_tables_json_codec(
    window: WindowAggregate, clock: PartitionClock
) -> None:
    # The table's value serializer is Faust's "json" codec: the round trip the changelog makes.
    stored = codecs.loads("json", codecs.dumps("json", encode_window(window)))
    assert decode_window(stored) == window
    assert decode_clock(codecs.loads("json", codecs.dumps("json", encode_clock(clock)))) == clock
