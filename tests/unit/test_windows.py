"""The window engine (stockstream/tables/windows.py): close rule, lateness, idempotence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stockstream.contracts.quotes import Quote
from stockstream.tables.state_codec import (
    decode_clock,
    decode_window,
    encode_clock,
    encode_window,
)
from stockstream.tables.windows import (
    AlreadyApplied,
    Applied,
    Late,
    PartitionClock,
    PartitionWindows,
)
from tests.reference import Record, assert_window_equal, expected_windows

T0 = 1_700_000_040_000  # a minute boundary
MIN = 60_000


def q(symbol: str, ts: int, price: float = 100.0, volume: float | None = 10.0) -> Quote:
    return Quote(
        symbol=symbol, current_price=price, market_timestamp=ts, source="simulator", volume=volume
    )


def engine(quorum: int = 1) -> PartitionWindows:
    return PartitionWindows(size_ms=MIN, grace_ms=5_000, quorum=quorum)


def test_window_closes_on_event_time_after_grace_not_before() -> None:
    w = engine()
    w.apply(q("AAPL", T0 + 1_000), 0)
    w.apply(q("AAPL", T0 + MIN + 4_999), 1)  # inside grace of the first window
    assert w.closable() == []
    w.apply(q("AAPL", T0 + MIN + 5_000), 2)  # watermark == end + grace
    assert [(x.symbol, x.start_ms) for x in w.closable()] == [("AAPL", T0)]


def test_event_within_grace_is_included_and_later_is_late() -> None:
    w = engine()
    w.apply(q("AAPL", T0 + 1_000, 10.0), 0)
    w.apply(q("AAPL", T0 + MIN + 3_000, 11.0), 1)
    inside = w.apply(q("AAPL", T0 + 59_000, 12.0), 2)  # out of order, within grace
    assert isinstance(inside, Applied) and inside.window.count == 2
    assert inside.window.close == 12.0
    w.apply(q("AAPL", T0 + MIN + 6_000, 11.0), 3)
    late = w.apply(q("AAPL", T0 + 30_000, 13.0), 4)
    assert isinstance(late, Late)
    assert "watermark" in late.reason


def test_open_close_follow_event_time_not_arrival() -> None:
    w = engine()
    w.apply(q("X", T0 + 30_000, 2.0), 0)
    w.apply(q("X", T0 + 10_000, 1.0), 1)  # earlier event time arrives later: the open
    w.apply(q("X", T0 + 50_000, 3.0), 2)
    w.apply(q("X", T0 + 40_000, 4.0), 3)
    window = w.open[("X", T0)]
    assert (window.open, window.close, window.min, window.max) == (1.0, 3.0, 1.0, 4.0)
    assert window.count == 4 and window.sum == 10.0
    assert (window.first_event_ms, window.last_event_ms) == (T0 + 10_000, T0 + 50_000)


def test_vwap_and_volume_null_without_volume() -> None:
    w = engine()
    w.apply(q("A", T0, 10.0, None), 0)
    w.apply(q("A", T0 + 1, 20.0, None), 1)
    record = w.open[("A", T0)].to_record()
    assert record["volume"] is None and record["vwap"] is None
    w.apply(q("B", T0, 10.0, 1.0), 2)
    w.apply(q("B", T0 + 1, 20.0, 3.0), 3)
    record = w.open[("B", T0)].to_record()
    assert record["volume"] == 4.0 and record["vwap"] == 17.5
    assert record["window_start"] == "2023-11-14T22:14:00.000Z"
    assert record["window_end"] == "2023-11-14T22:15:00.000Z"


def test_replay_of_an_applied_record_is_not_counted_twice() -> None:
    w = engine()
    w.apply(q("A", T0), 5)
    assert isinstance(w.apply(q("A", T0), 5), AlreadyApplied)
    assert w.open[("A", T0)].count == 1


def test_restored_state_after_crash_gives_the_same_result() -> None:
    """Crash after some window writes but before the clock checkpoint: replaying from the
    committed offset reproduces exactly the uninterrupted result."""
    quotes = [q("A", T0 + i * 7_000, 100.0 + i) for i in range(30)]
    straight = engine()
    for offset, quote in enumerate(quotes):
        straight.apply(quote, offset)
    # A restarted worker sees the table as of offset 17 (window writes persisted) but
    # the clock only as of the last checkpoint; the consumer restarts from offset 10.
    crashed = engine()
    for offset, quote in enumerate(quotes[:18]):
        crashed.apply(quote, offset)
    restored = PartitionWindows(
        MIN,
        5_000,
        clock=PartitionClock(),
        open={k: decode_window(encode_window(v)) for k, v in crashed.open.items()},
    )
    for offset, quote in enumerate(quotes[10:], start=10):
        restored.apply(quote, offset)
    assert {k: v.to_record() for k, v in restored.open.items()} == {
        k: v.to_record() for k, v in straight.open.items()
    }


def test_partitions_are_independent() -> None:
    """Unlike Faust's shared last_closed_window, partition 0 racing ahead neither closes nor
    drops partition 1's windows."""
    p0, p1 = engine(), engine()
    p1.apply(q("B", T0 + 1_000), 0)
    p0.apply(q("A", T0 + 10 * MIN), 0)
    assert p1.closable() == [] and ("B", T0) in p1.open
    assert isinstance(p1.apply(q("B", T0 + 2_000), 1), Applied)


def test_no_wall_clock_involved_replaying_old_data() -> None:
    """Month-old event times close windows only as event time advances (Faust closes on
    time.time())."""
    old = T0 - 30 * 24 * 3600 * 1000
    w = engine()
    w.apply(q("A", old), 0)
    assert w.closable() == []
    w.apply(q("A", old + MIN + 5_000), 1)
    assert [x.start_ms for x in w.closable()] == [old]


def test_flush_closes_everything_and_later_records_for_flushed_windows_are_late() -> None:
    w = engine()
    w.apply(q("A", T0 + 1_000), 0)
    w.apply(q("B", T0 + MIN + 1_000), 1)
    flushed = w.flush()
    assert [(x.symbol, x.start_ms) for x in flushed] == [("A", T0), ("B", T0 + MIN)]
    w.remove(flushed)
    # Late per symbol: each symbol's windows stay in start order, and a flushed window of
    # one symbol closes nothing of another.
    assert isinstance(w.apply(q("B", T0 + MIN + 2_000), 2), Late)
    assert isinstance(w.apply(q("B", T0 + 3_000), 3), Late)
    assert isinstance(w.apply(q("A", T0 + 2_000), 4), Late)
    assert isinstance(w.apply(q("A", T0 + MIN + 2_000), 5), Applied)
    assert isinstance(w.apply(q("C", T0 + MIN + 2_000), 6), Applied)


def test_state_round_trip() -> None:
    w = engine()
    w.apply(q("A", T0 + 1, 5.0, None), 3)
    agg = w.open[("A", T0)]
    assert decode_window(encode_window(agg)) == agg
    clock = PartitionClock(1, 2, 3, 4)
    assert decode_clock(encode_clock(clock)) == clock


events = st.lists(
    st.tuples(
        st.sampled_from(["A", "B", "C"]),
        st.integers(min_value=0, max_value=6 * MIN),
        st.floats(min_value=0.01, max_value=1_000, allow_nan=False),
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(min_value=1, max_value=4))
def test_engine_matches_batch_recomputation(
    evts: list[tuple[str, int, float, float | None]], quorum: int
) -> None:
    w = engine(quorum)
    emitted: dict[tuple[str, int], dict[str, object]] = {}
    late = []
    records = []
    for offset, (symbol, dt, price, volume) in enumerate(evts):
        quote = q(symbol, T0 + dt, price, volume)
        records.append(Record(0, offset, symbol, price, T0 + dt, volume))
        outcome = w.apply(quote, offset)
        if isinstance(outcome, Late):
            late.append(offset)
        due = w.closable()
        for window in due:
            assert (window.symbol, window.start_ms) not in emitted  # exactly once
            emitted[(window.symbol, window.start_ms)] = window.to_record()
        w.remove(due)
    for window in w.flush():
        assert (window.symbol, window.start_ms) not in emitted
        emitted[(window.symbol, window.start_ms)] = window.to_record()
    expected, expected_late = expected_windows(records, quorum=quorum)
    assert sorted(emitted) == sorted(expected)
    for key, want in expected.items():
        assert_window_equal(emitted[key], want)
    assert late == [r.offset for r in expected_late]


def test_clock_covers_windows_it_already_closed() -> None:
    """A restored window the restored clock has passed is stale (closed before the crash)."""
    w = engine()
    w.apply(q("A", T0 + 1_000), 0)
    w.apply(q("B", T0 + 3 * MIN), 1)
    old, new = w.open[("A", T0)], w.open[("B", T0 + 3 * MIN)]
    assert w.covers(old) and not w.covers(new)
    w.clock = PartitionClock(watermark_ms=-1, closed_until_ms=T0 + 4 * MIN)
    assert w.covers(new)


DAY = 24 * 60 * MIN


def test_one_symbol_with_a_wrong_clock_closes_nothing_of_the_others() -> None:
    w = engine(quorum=2)
    for i, symbol in enumerate("ABC"):
        w.apply(q(symbol, T0 + 1_000 + i), i)
    # A's source jumps a month ahead (a bad clock, or a mis-dated row in a replay).
    future = w.apply(q("A", T0 + 30 * DAY), 3)
    assert isinstance(future, Applied)
    assert w.closable() == []
    assert w.clock.watermark_ms == T0 + 1_002  # the second-highest symbol: C
    # Everyone's on-time quotes still count, A's included.
    for offset, symbol in enumerate("ABC", start=4):
        assert isinstance(w.apply(q(symbol, T0 + 30_000), offset), Applied)
    # The partition moves on when two symbols have: windows close normally.
    w.apply(q("B", T0 + MIN + 6_000), 7)
    w.apply(q("C", T0 + MIN + 6_000), 8)
    assert sorted(x.symbol for x in w.closable()) == ["A", "B", "C"]


def test_with_a_quorum_of_one_the_highest_event_time_closes_everything() -> None:
    w = engine(quorum=1)
    w.apply(q("B", T0 + 1_000), 0)
    w.apply(q("A", T0 + 30 * DAY), 1)
    assert [x.symbol for x in w.closable()] == ["B"]
    assert isinstance(w.apply(q("C", T0 + 2_000), 2), Late)


def test_an_overnight_gap_closes_yesterday_when_the_symbols_open() -> None:
    w = engine(quorum=2)
    for i, symbol in enumerate("ABC"):
        w.apply(q(symbol, T0 + 1_000 + i), i)
    morning = T0 + 17 * 60 * MIN
    w.apply(q("A", morning), 3)
    assert w.closable() == []
    w.apply(q("B", morning + 1), 4)
    assert sorted(x.symbol for x in w.closable()) == ["A", "B", "C"]


def test_a_partition_with_fewer_symbols_than_the_quorum_follows_all_of_them() -> None:
    w = engine(quorum=3)
    w.apply(q("A", T0 + 1_000), 0)
    w.apply(q("A", T0 + MIN + 5_000), 1)
    assert [x.symbol for x in w.closable()] == ["A"]
    w.apply(q("B", T0 + MIN + 2_000), 2)  # B joins: now both must move
    assert isinstance(w.apply(q("A", T0 + 5 * MIN), 3), Applied)
    assert w.clock.watermark_ms == T0 + MIN + 5_000


# -- trade conditions ----------------------------------------------------------------------

ODD_LOT = "12"


def trade(ts: int, price: float, volume: float, *codes: str) -> Quote:
    return Quote(
        symbol="AAPL",
        current_price=price,
        market_timestamp=ts,
        source="finnhub-trade",
        volume=volume,
        conditions=codes or None,
    )


def conditioned() -> PartitionWindows:
    return PartitionWindows(MIN, 5_000, excluded_conditions=frozenset({ODD_LOT, "24"}))


def test_an_odd_lot_adds_volume_but_sets_no_price() -> None:
    w = conditioned()
    w.apply(trade(T0 + 1_000, 100.0, 200, "1"), 0)
    w.apply(trade(T0 + 2_000, 150.0, 5, "1", ODD_LOT), 1)  # would be the high and the close
    w.apply(trade(T0 + 500, 50.0, 7, ODD_LOT), 2)  # would be the low and the open
    (window,) = w.open.values()
    record = window.to_record()
    assert (record["open"], record["max"], record["min"], record["close"]) == (100.0,) * 4
    assert record["count"] == 1 and record["avg"] == 100.0
    assert record["volume"] == 212
    assert record["vwap"] == 100.0  # weighed by the priced volume only
    assert (record["first_event_ms"], record["last_event_ms"]) == (T0 + 500, T0 + 2_000)


def test_a_window_of_only_excluded_trades_keeps_their_prices_until_a_priced_one() -> None:
    w = conditioned()
    w.apply(trade(T0 + 1_000, 90.0, 10, "24", ODD_LOT), 0)
    w.apply(trade(T0 + 2_000, 95.0, 30, "24"), 1)
    (window,) = w.open.values()
    stand_in = window.to_record()
    assert (stand_in["open"], stand_in["close"], stand_in["count"]) == (90.0, 95.0, 2)
    assert stand_in["volume"] == 40 and stand_in["vwap"] == (90 * 10 + 95 * 30) / 40
    w.apply(trade(T0 + 3_000, 101.0, 100, "1"), 2)
    record = window.to_record()
    assert (record["open"], record["min"], record["max"], record["close"]) == (101.0,) * 4
    assert record["count"] == 1 and record["volume"] == 140 and record["vwap"] == 101.0
    assert record["first_event_ms"] == T0 + 1_000


def test_conditions_outside_the_set_and_none_are_priced() -> None:
    w = conditioned()
    w.apply(trade(T0 + 1_000, 100.0, 1, "1", "8"), 0)
    w.apply(Quote("AAPL", 104.0, T0 + 2_000, "finnhub-quote"), 1)  # REST: no conditions
    (window,) = w.open.values()
    assert window.count == 2 and window.max == 104.0


def test_condition_state_survives_the_changelog() -> None:
    w = conditioned()
    w.apply(trade(T0 + 1_000, 90.0, 10, ODD_LOT), 0)
    (window,) = w.open.values()
    assert decode_window(encode_window(window)) == window
    w.apply(trade(T0 + 2_000, 100.0, 10, "1"), 1)
    w.apply(trade(T0 + 3_000, 99.0, 4, ODD_LOT), 2)
    assert decode_window(encode_window(window)) == window
    # State written before these fields existed reads as "no excluded trades".
    old = encode_window(window)
    del old["excluded_volume"], old["provisional"]
    restored = decode_window(old)
    assert restored.excluded_volume == 0.0 and restored.provisional is False


@given(
    st.lists(
        st.tuples(
            st.integers(0, MIN - 1),
            st.floats(1, 1000),
            st.floats(0, 1000),
            st.sampled_from([(), ("1",), (ODD_LOT,), ("1", "24"), ("8",)]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_priced_fields_come_only_from_priced_trades_when_there_are_any(
    trades: list[tuple[int, float, float, tuple[str, ...]]],
) -> None:
    w = conditioned()
    for offset, (dt, price, volume, codes) in enumerate(trades):
        w.apply(trade(T0 + dt, price, volume, *codes), offset)
    (window,) = w.open.values()
    record = window.to_record()
    priced = [t for t in trades if not {ODD_LOT, "24"} & set(t[3])]
    pool = priced or trades
    assert record["count"] == len(pool)
    assert record["min"] == min(t[1] for t in pool) and record["max"] == max(t[1] for t in pool)
    assert abs(record["volume"] - sum(t[2] for t in trades)) <= 1e-9 * len(trades) * 1000


def test_excluded_conditions_setting_none_lets_every_trade_set_prices() -> None:
    from stockstream.settings import AggregationSettings

    assert "12" in AggregationSettings().excluded_condition_codes
    assert AggregationSettings(excluded_conditions=("none",)).excluded_condition_codes == set()
