"""The anomaly rules alone (agents/anomaly/statistics.py): the z-score against an independent
recomputation, min history, cool-down, gaps, re-read windows, and the windows it refuses."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockstream.agents.anomaly.statistics import Rules, Window, observe, score
from stockstream.contracts.anomalies import AnomalyKind, parse_anomaly
from stockstream.contracts.windows import WindowRecordError, window_record
from stockstream.tables.anomaly_state import SymbolHistory, encode_history
from tests.unit.test_anomaly_reference import RefWindow, expected_anomalies

T0 = 1_767_623_400_000
MIN = 60_000
RULES = Rules(z_threshold=3.0, history_windows=10, min_history=5, cooldown_ms=5 * MIN)


def window(minute: int, close: float, volume: float | None = 100.0, symbol: str = "AAPL") -> Window:
    return Window(symbol, T0 + minute * MIN, T0 + (minute + 1) * MIN, close, volume)


def run(windows: list[Window], rules: Rules = RULES) -> tuple[SymbolHistory | None, list[Any]]:
    history: SymbolHistory | None = None
    found = []
    for w in windows:
        observed = observe(history, w, rules)
        if observed is not None:
            history = observed.history
            found.extend(observed.anomalies)
    return history, found


def calm(minutes: int, start: int = 0) -> list[Window]:
    """Closes alternating around 100 and volumes around 100: small, non-zero spread."""
    return [
        window(m, 100.0 + (0.1 if m % 2 else -0.1) + 0.01 * (m % 3), 100.0 + 5 * (m % 4))
        for m in range(start, start + minutes)
    ]


# -- the z-score -----------------------------------------------------------------------------

values = st.integers(-(10**6), 10**6).map(lambda i: i / 1000)


@given(st.lists(values, min_size=2, max_size=60), values)
def test_z_equals_an_independent_recomputation(history: list[float], value: float) -> None:
    judged = score(value, history)
    if len(set(history)) == 1:
        assert judged is None  # stddev 0: no judgement
        return
    assert judged is not None
    exact = [Fraction(x) for x in history]
    mean = statistics.mean(exact)
    stddev = math.sqrt(statistics.variance(exact))
    assert judged.history == len(history)
    assert math.isclose(judged.mean, float(mean), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(judged.stddev, stddev, rel_tol=1e-9)
    assert math.isclose(judged.z, (value - float(mean)) / stddev, rel_tol=1e-9, abs_tol=1e-9)


@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=0, max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
)
def test_any_finite_numbers_give_a_finite_score_or_none(history: list[float], value: float) -> None:
    judged = score(value, history)
    if judged is not None:
        assert all(math.isfinite(x) for x in (judged.mean, judged.stddev, judged.z))
        assert judged.stddev > 0


def test_constant_history_is_not_judged() -> None:
    assert score(1e9, [5.0] * 30) is None
    assert score(5.0, [5.0]) is None


# -- the rules over a sequence, against the reference -----------------------------------------


@st.composite
def sequences(draw: st.DrawFn) -> tuple[list[Window], Rules]:
    history_windows = draw(st.integers(2, 8))
    rules = Rules(
        z_threshold=draw(st.sampled_from([1.3, 2.2, 2.7183])),
        history_windows=history_windows,
        min_history=draw(st.integers(2, history_windows)),
        cooldown_ms=draw(st.integers(0, 4)) * MIN,
    )
    windows: list[Window] = []
    for symbol in ("A", "B"):
        minute, close = 0, 100.0
        for _ in range(draw(st.integers(0, 25))):
            minute += draw(st.sampled_from([1, 1, 1, 1, 2, 3]))
            close = round(close * (1 + draw(st.integers(-50, 50)) / 1000), 4)
            volume = draw(st.one_of(st.none(), st.integers(0, 1000).map(float)))
            windows.append(window(minute, max(close, 0.01), volume, symbol))
    return windows, rules


@settings(max_examples=150, deadline=None)  # timing is not what it tests
@given(sequences())
def test_anomalies_equal_an_independent_recomputation(case: tuple[list[Window], Rules]) -> None:
    windows, rules = case
    found: dict[tuple[str, int, str], Any] = {}
    histories: dict[str, SymbolHistory] = {}
    for w in windows:
        observed = observe(histories.get(w.symbol), w, rules)
        assert observed is not None
        histories[w.symbol] = observed.history
        for a in observed.anomalies:
            assert a.identity not in found
            found[a.identity] = a
    expected = expected_anomalies(
        [RefWindow(w.symbol, w.start_ms, w.end_ms, w.close, w.volume) for w in windows],
        rules.z_threshold,
        rules.history_windows,
        rules.min_history,
        rules.cooldown_ms,
    )
    assert set(found) == set(expected)
    for identity, anomaly in found.items():
        ref = expected[identity]
        assert anomaly.score.history == ref["history"] >= rules.min_history
        assert math.isclose(anomaly.score.z, ref["z"], rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(anomaly.score.value, ref["value"], rel_tol=1e-12, abs_tol=1e-15)
    for history in histories.values():
        assert len(history.returns) <= rules.history_windows
        assert len(history.volumes) <= rules.history_windows


# -- the rules, one at a time -------------------------------------------------------------------


def test_a_price_jump_and_a_volume_spike_after_enough_history_are_anomalies() -> None:
    _, found = run([*calm(8), window(8, 120.0, 5_000.0)])
    assert {(a.kind, a.window.start_ms) for a in found} == {
        (AnomalyKind.RETURN, T0 + 8 * MIN),
        (AnomalyKind.VOLUME, T0 + 8 * MIN),
    }
    jump = next(a for a in found if a.kind is AnomalyKind.RETURN)
    assert jump.score.value == pytest.approx(120.0 / calm(8)[-1].close - 1)
    record = parse_anomaly(jump.record(3.0, T0 + 9 * MIN))
    assert record["z"] == pytest.approx(jump.score.z)
    assert record["history"] == 7  # 8 calm windows, 7 returns among them
    assert record["close"] == 120.0 and record["volume"] == 5_000.0


def test_nothing_is_judged_before_min_history() -> None:
    # Four calm windows: 4 volumes and 3 returns, both below min_history 5.
    _, found = run([*calm(4), window(4, 500.0, 1e9)])
    assert found == []
    # One more calm window: the volume history reaches 5, the returns still 4.
    _, found = run([*calm(5), window(5, 500.0, 1e9)])
    assert [a.kind for a in found] == [AnomalyKind.VOLUME]


def test_cooldown_is_per_kind_in_event_time_and_not_restarted_by_suppressed_ones() -> None:
    # Each spike dwarfs the ones before (which joined the history), so each is far out.
    spikes = {8: 1e6, 11: 1e8, 13: 1e10, 14: 1e12, 20: 1e14}
    windows = [window(m, w.close, spikes.get(m, w.volume)) for m, w in enumerate(calm(21))]

    def minutes(cooldown_ms: int) -> list[int]:
        rules = Rules(z_threshold=3.0, history_windows=30, min_history=5, cooldown_ms=cooldown_ms)
        _, found = run(windows, rules)
        return [(a.window.start_ms - T0) // MIN for a in found if a.kind is AnomalyKind.VOLUME]

    assert minutes(0) == [8, 11, 13, 14, 20]
    # 11 is within 5 minutes of 8; 13 is 5 minutes after 8 (11, suppressed, did not restart
    # the cool-down); 14 is within 5 minutes of 13.
    assert minutes(5 * MIN) == [8, 13, 20]


def test_a_gap_skips_the_return_but_keeps_the_close() -> None:
    before = calm(8)
    history, found = run([*before, window(10, 150.0, None)])  # minutes 8 and 9 missing
    assert found == []
    assert history is not None
    assert len(history.returns) == 7  # the return across the gap was not folded
    assert history.last_close == 150.0
    # The next minute's return is measured from the close after the gap.
    history, found = run([*before, window(10, 150.0, None), window(11, 150.0 * 1.3, None)])
    assert [a.kind for a in found] == [AnomalyKind.RETURN]
    assert found[0].score.value == pytest.approx(0.3)


def test_a_reread_window_is_not_folded_twice() -> None:
    windows = [*calm(8), window(8, 120.0, 5_000.0)]
    history, _ = run(windows)
    assert history is not None
    stored = encode_history(history)
    for again in windows:
        assert observe(history, again, RULES) is None
    assert encode_history(history) == stored


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"close": 0.0}, "close"),
        ({"volume": -1.0}, "volume"),
        ({"window_end": "2026-01-05T14:30:00Z"}, "window_end"),
        ({"symbol": "X" * 65}, "symbol"),
        ({"close": "1"}, "close"),
        ({"window_start_ms": -1}, "window_start_ms"),
    ],
)
def test_windows_the_aggregation_cannot_produce_are_refused(
    change: dict[str, Any], error: str
) -> None:
    record = window_record(
        symbol="AAPL",
        start_ms=T0,
        end_ms=T0 + MIN,
        count=1,
        total=10.0,
        low=10.0,
        high=10.0,
        open_price=10.0,
        close_price=10.0,
        volume=1.0,
        price_volume=10.0,
        first_event_ms=T0,
        last_event_ms=T0,
    )
    assert Window.from_record(record) == Window("AAPL", T0, T0 + MIN, 10.0, 1.0)
    with pytest.raises(WindowRecordError, match=f"^{error}"):
        Window.from_record({**record, **change})
