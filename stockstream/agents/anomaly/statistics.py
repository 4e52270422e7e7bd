"""The anomaly rules, pure (no Faust, no I/O): how one closed window is judged against its
symbol's history and then folded into it.

- The history of a symbol is two series, each of at most ANOMALY_HISTORY_WINDOWS values, oldest
  first: one-minute returns (close / previous window's close - 1) and window volumes.
- A value is judged against its series once that holds ANOMALY_MIN_HISTORY values:
  z = (value - mean) / stddev, with the sample standard deviation (n - 1) of the series before
  the value joins it. |z| > ANOMALY_Z_THRESHOLD is an anomaly. A series whose values are all
  equal has stddev 0: no judgement (any change would be infinitely far).
- A return needs the window right before (start = previous start + window length) with both
  closes > 0. After a gap (minutes without a window) the change is not a one-minute return:
  it is neither judged nor folded, but the close becomes the reference for the next window.
- A window without volume (no quote had one) judges and folds no volume.
- Cool-down: after an anomaly of one kind for a symbol, the same kind for that symbol is not
  reported again until ANOMALY_COOLDOWN_SECONDS of event time (window starts) have passed.
  Suppressed ones do not restart the cool-down.
- Every window is folded, anomalous or not, so a lasting change becomes the new normal.
- A window at or before the last window folded for its symbol was folded already (re-read
  after a restart): it is neither judged nor folded again (`observe` returns None).
Judging is deterministic in (history, window): a window re-read after a crash, whose fold was
lost, yields the same anomalies again, which the emitter then finds already written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stockstream.contracts.anomalies import AnomalyKind, anomaly_record
from stockstream.contracts.windows import WindowRecordError, parse_window
from stockstream.settings import AnomalySettings
from stockstream.tables.anomaly_state import SymbolHistory

#: The anomaly contract's bound on symbols (a longer one cannot be reported).
MAX_SYMBOL_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Rules:
    z_threshold: float
    history_windows: int
    min_history: int
    cooldown_ms: int

    @classmethod
    def from_settings(cls, settings: AnomalySettings) -> Rules:
        return cls(
            z_threshold=settings.z_threshold,
            history_windows=settings.history_windows,
            min_history=settings.min_history,
            cooldown_ms=round(settings.cooldown_seconds * 1000),
        )


@dataclass(frozen=True, slots=True)
class Window:
    """What the rules need of a closed window."""

    symbol: str
    start_ms: int
    end_ms: int
    close: float
    volume: float | None

    @classmethod
    def from_record(cls, record: Any) -> Window:
        """A `stock-quotes-aggregated` record checked by its contract, plus what the
        aggregation always gives and the rules rely on; raises `WindowRecordError`."""
        row = parse_window(record)
        symbol = row["symbol"]
        if len(symbol) > MAX_SYMBOL_LENGTH:
            raise WindowRecordError(f"symbol: longer than {MAX_SYMBOL_LENGTH} characters")
        start, end = row["window_start"], row["window_end"]
        if end <= start:
            raise WindowRecordError(f"window_end: {end} is not after window_start {start}")
        if row["close"] <= 0:
            raise WindowRecordError(f"close: must be > 0, got {row['close']!r}")
        volume = row["volume"]
        if volume is not None and volume < 0:
            raise WindowRecordError(f"volume: must be >= 0, got {volume!r}")
        return cls(symbol, start, end, row["close"], volume)


@dataclass(frozen=True, slots=True)
class Score:
    value: float
    mean: float
    stddev: float
    z: float
    history: int


def score(value: float, history: Sequence[float]) -> Score | None:
    """`value` against `history`; None when there is no judgement: fewer than two values,
    all values equal (stddev 0), or numbers beyond what a float can carry."""
    n = len(history)
    if n < 2 or min(history) == max(history):
        return None
    try:
        mean = math.fsum(history) / n
        variance = math.fsum((x - mean) * (x - mean) for x in history) / (n - 1)
        stddev = math.sqrt(variance)
        z = (value - mean) / stddev
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(mean) and math.isfinite(z) and math.isfinite(stddev) and stddev > 0):
        return None
    return Score(value, mean, stddev, z, n)


@dataclass(frozen=True, slots=True)
class Anomaly:
    kind: AnomalyKind
    window: Window
    score: Score

    @property
    def identity(self) -> tuple[str, int, str]:
        """As `contracts.anomalies.anomaly_identity` reads it from the record."""
        return self.window.symbol, self.window.start_ms, self.kind.value

    def record(self, threshold: float, detected_at_ms: int) -> dict[str, Any]:
        w, s = self.window, self.score
        return anomaly_record(
            symbol=w.symbol,
            start_ms=w.start_ms,
            end_ms=w.end_ms,
            kind=self.kind,
            value=s.value,
            mean=s.mean,
            stddev=s.stddev,
            threshold=threshold,
            history=s.history,
            close=w.close,
            volume=w.volume,
            detected_at_ms=detected_at_ms,
        )


@dataclass(frozen=True, slots=True)
class Observation:
    history: SymbolHistory  # after the fold
    anomalies: list[Anomaly]
    gap: bool  # the previous window is not the one right before: no return


def one_minute_return(history: SymbolHistory, window: Window) -> float | None:
    """The return since the window right before, or None (gap, or a close not > 0)."""
    if window.start_ms - history.last_start_ms != window.end_ms - window.start_ms:
        return None
    if history.last_close <= 0:
        return None
    change = window.close / history.last_close - 1
    return change if math.isfinite(change) else None


def observe(history: SymbolHistory | None, window: Window, rules: Rules) -> Observation | None:
    """Judge `window` against `history`, then fold it in (`history` is changed in place; a
    new one is made for a symbol's first window). None: the window was folded before."""
    if history is None:
        history = SymbolHistory(window.symbol, window.start_ms, window.close)
        if window.volume is not None:
            history.volumes.append(window.volume)
        return Observation(history, [], gap=False)
    if window.start_ms <= history.last_start_ms:
        return None
    change = one_minute_return(history, window)
    anomalies: list[Anomaly] = []
    for kind, value, series in (
        (AnomalyKind.RETURN, change, history.returns),
        (AnomalyKind.VOLUME, window.volume, history.volumes),
    ):
        if value is None:
            continue
        recent = series[-rules.history_windows :]
        if len(recent) >= rules.min_history:
            judged = score(value, recent)
            if judged is not None and abs(judged.z) > rules.z_threshold:
                last = history.last_reported_ms.get(kind.value)
                if last is None or window.start_ms - last >= rules.cooldown_ms:
                    anomalies.append(Anomaly(kind, window, judged))
                    history.last_reported_ms[kind.value] = window.start_ms
        series.append(value)
        del series[: -rules.history_windows]
    gap = window.start_ms - history.last_start_ms != window.end_ms - window.start_ms
    history.last_start_ms = window.start_ms
    history.last_close = window.close
    return Observation(history, anomalies, gap)
