"""An independent, naive recomputation of the anomaly rules (README, "Real-time anomalies"),
used to check the detector (unit tests here, the real worker in
tests/integration/test_anomalies.py). No shared code with stockstream.agents.anomaly: exact
`statistics` mean and sample stdev, plain loops."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RefWindow:
    symbol: str
    start_ms: int
    end_ms: int
    close: float
    volume: float | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> RefWindow:
        """From a `stock-quotes-aggregated` record."""
        start = record["window_start_ms"]
        end = start + (_iso_ms(record["window_end"]) - _iso_ms(record["window_start"]))
        return cls(record["symbol"], start, end, record["close"], record["volume"])


def _iso_ms(text: str) -> int:
    from datetime import datetime

    return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def expected_anomalies(
    windows: Iterable[RefWindow],
    z_threshold: float,
    history_windows: int,
    min_history: int,
    cooldown_ms: int,
) -> dict[tuple[str, int, str], dict[str, float]]:
    """(symbol, window_start_ms, kind) -> {value, mean, stddev, z, history}, for windows given
    per symbol in start order."""
    by_symbol: dict[str, list[RefWindow]] = defaultdict(list)
    for w in windows:
        by_symbol[w.symbol].append(w)
    found: dict[tuple[str, int, str], dict[str, float]] = {}
    for symbol, series in by_symbol.items():
        returns: list[float] = []
        volumes: list[float] = []
        last_reported: dict[str, int] = {}
        previous: RefWindow | None = None
        for w in series:
            if previous is not None and w.start_ms <= previous.start_ms:
                continue
            change = None
            if (
                previous is not None
                and w.start_ms - previous.start_ms == w.end_ms - w.start_ms
                and previous.close > 0
            ):
                change = w.close / previous.close - 1
            for kind, value, values in (("return", change, returns), ("volume", w.volume, volumes)):
                if value is None:
                    continue
                history = values[-history_windows:]
                if len(history) >= min_history and len(set(history)) > 1:
                    mean = statistics.mean(history)
                    stddev = statistics.stdev(history)
                    z = (value - mean) / stddev
                    last = last_reported.get(kind)
                    if abs(z) > z_threshold and (last is None or w.start_ms - last >= cooldown_ms):
                        last_reported[kind] = w.start_ms
                        found[(symbol, w.start_ms, kind)] = {
                            "value": value,
                            "mean": mean,
                            "stddev": stddev,
                            "z": z,
                            "history": len(history),
                        }
                values.append(value)
            previous = w
    return found


def test_the_reference_finds_a_spike_after_enough_history() -> None:
    windows = [
        RefWindow("A", m * 60_000, (m + 1) * 60_000, 100.0 + (m % 2), 10.0 + (m % 3))
        for m in range(6)
    ]
    windows.append(RefWindow("A", 6 * 60_000, 7 * 60_000, 150.0, 1000.0))
    found = expected_anomalies(windows, 3.0, 10, 4, 0)
    assert set(found) == {("A", 6 * 60_000, "return"), ("A", 6 * 60_000, "volume")}
    assert found[("A", 6 * 60_000, "volume")]["history"] == 6


def test_the_reference_skips_returns_over_a_gap() -> None:
    windows = [
        RefWindow("A", m * 60_000, (m + 1) * 60_000, 100.0 + (m % 2), None) for m in range(6)
    ]
    windows.append(RefWindow("A", 9 * 60_000, 10 * 60_000, 150.0, None))
    assert expected_anomalies(windows, 3.0, 10, 4, 0) == {}
