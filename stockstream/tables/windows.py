"""Event-time tumbling windows of one partition: aggregation and the close rule.

Pure logic, no Faust and no I/O, so every rule is unit-testable and the agent stays thin.

Close rule (per partition, because a partition is the unit of ordering and of ownership):
- each symbol has its own progress, the highest `market_timestamp` it has reached;
- the partition's watermark is the highest event time that at least `quorum` symbols of the
  partition have reached (all of them while it has fewer): the quorum-th largest symbol
  progress, never decreasing. So one symbol with a wrong clock -- a quote minutes or a month
  ahead -- cannot close the other symbols' windows (with quorum 1 it would: that is the
  classic "highest event time seen" watermark). Overnight gaps and replays move all symbols
  together, so they behave as before;
- window `[start, end)` closes once `watermark >= end + grace`;
- `flush()` closes every open window when the partition went idle (decided by the caller), and
  remembers per symbol up to where it closed, so that no window is ever emitted twice and a
  symbol's windows still come out in start order;
- an event whose window is already closed is *late*: the caller dead-letters it. A late event
  moves no clock.

Idempotence: each window remembers the highest source offset folded into it and the partition
clock remembers the last offset whose effects were checkpointed, so re-reading records after a
crash (at-least-once delivery) never counts a quote twice.
"""

from __future__ import annotations

import heapq
import sys
from dataclasses import dataclass, field
from typing import Any

from stockstream.contracts.quotes import Quote
from stockstream.contracts.timestamps import iso_utc
from stockstream.contracts.windows import window_record


@dataclass(slots=True)
class WindowAggregate:
    symbol: str
    start_ms: int
    size_ms: int
    count: int
    sum: float
    min: float
    max: float
    open: float
    open_ts: int
    close: float
    close_ts: int
    volume: float | None
    price_volume: float
    first_event_ms: int
    last_event_ms: int
    last_offset: int
    # Volume of trades whose conditions leave them out of the price fields (odd lots...):
    # counted in `volume`, not in the VWAP's denominator.
    excluded_volume: float = 0.0
    # True while every quote of the window was such a trade: its prices stand in until the
    # first priced quote replaces them, so a window never lacks prices.
    provisional: bool = False

    @classmethod
    def first(
        cls, quote: Quote, start_ms: int, size_ms: int, offset: int, priced: bool = True
    ) -> WindowAggregate:
        price, ts = quote.current_price, quote.market_timestamp
        return cls(
            symbol=quote.symbol,
            start_ms=start_ms,
            size_ms=size_ms,
            count=1,
            sum=price,
            min=price,
            max=price,
            open=price,
            open_ts=ts,
            close=price,
            close_ts=ts,
            volume=quote.volume,
            price_volume=price * quote.volume if quote.volume is not None else 0.0,
            first_event_ms=ts,
            last_event_ms=ts,
            last_offset=offset,
            provisional=not priced,
        )

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.size_ms

    def add(self, quote: Quote, offset: int, priced: bool = True) -> None:
        price, ts = quote.current_price, quote.market_timestamp
        if priced and self.provisional:
            self._reprice(quote, offset)
            return
        if not priced and not self.provisional:
            # Under US consolidated-tape rules such a print (e.g. an odd lot) does not set the
            # last price, high or low; its shares are still traded volume.
            if quote.volume is not None:
                self.volume = (self.volume or 0.0) + quote.volume
                self.excluded_volume += quote.volume
            self.first_event_ms = min(self.first_event_ms, ts)
            self.last_event_ms = max(self.last_event_ms, ts)
            self.last_offset = offset
            return
        self.count += 1
        self.sum += price
        self.min = min(self.min, price)
        self.max = max(self.max, price)
        # Open/close are by event time; on equal timestamps the first/last in offset order wins,
        # which is the order the producer observed them.
        if ts < self.open_ts:
            self.open, self.open_ts = price, ts
        if ts >= self.close_ts:
            self.close, self.close_ts = price, ts
        if quote.volume is not None:
            self.volume = (self.volume or 0.0) + quote.volume
            self.price_volume += price * quote.volume
        self.first_event_ms = min(self.first_event_ms, ts)
        self.last_event_ms = max(self.last_event_ms, ts)
        self.last_offset = offset

    def _reprice(self, quote: Quote, offset: int) -> None:
        """The first priced quote of a provisional window: the stand-in prices go, their
        volume stays (now as excluded volume)."""
        events = (self.first_event_ms, self.last_event_ms)
        excluded = self.volume or 0.0
        fresh = WindowAggregate.first(quote, self.start_ms, self.size_ms, offset)
        for name in ("count", "sum", "min", "max", "open", "open_ts", "close", "close_ts"):
            setattr(self, name, getattr(fresh, name))
        self.price_volume = fresh.price_volume
        if quote.volume is not None or self.volume is not None:
            self.volume = excluded + (quote.volume or 0.0)
        self.excluded_volume = excluded
        self.provisional = False
        self.first_event_ms = min(events[0], quote.market_timestamp)
        self.last_event_ms = max(events[1], quote.market_timestamp)
        self.last_offset = offset

    def to_record(self) -> dict[str, Any]:
        """The `stock-quotes-aggregated` record of this window."""
        return window_record(
            symbol=self.symbol,
            start_ms=self.start_ms,
            end_ms=self.end_ms,
            count=self.count,
            total=self.sum,
            low=self.min,
            high=self.max,
            open_price=self.open,
            close_price=self.close,
            volume=self.volume,
            priced_volume=None if self.volume is None else self.volume - self.excluded_volume,
            price_volume=self.price_volume,
            first_event_ms=self.first_event_ms,
            last_event_ms=self.last_event_ms,
        )


@dataclass(slots=True)
class PartitionClock:
    """Event-time progress of one source partition; checkpointed whenever windows close."""

    watermark_ms: int = -1
    # Windows ending at or before this are closed for every symbol (state written by 0.1,
    # whose idle flush closed per partition; no longer advanced).
    closed_until_ms: int = -1
    last_offset: int = -1
    emitted_offset: int = -1
    # Per symbol: the highest event time reached, and the end of the newest window an idle
    # flush closed.
    symbol_watermarks: dict[str, int] = field(default_factory=dict)
    symbol_closed_until: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Applied:
    window: WindowAggregate


@dataclass(frozen=True, slots=True)
class Late:
    window_start_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class AlreadyApplied:
    """A redelivered record (re-read after a crash) whose effect the restored state holds."""


Outcome = Applied | Late | AlreadyApplied


@dataclass(slots=True)
class PartitionWindows:
    size_ms: int
    grace_ms: int
    clock: PartitionClock = field(default_factory=PartitionClock)
    open: dict[tuple[str, int], WindowAggregate] = field(default_factory=dict)
    # How many symbols must have reached an event time before the watermark moves there.
    quorum: int = 1
    # Trade condition codes that leave a quote out of the price fields (AGG_EXCLUDED_CONDITIONS).
    excluded_conditions: frozenset[str] = frozenset()
    # End of the oldest open window: lets `closable()` answer "nothing" without a scan.
    _earliest_end: int = sys.maxsize
    # The `quorum` symbols with the highest progress (kept on every advance, so the
    # watermark is one `min` over at most `quorum` values instead of a scan of all symbols).
    _leaders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ValueError(f"quorum must be >= 1, got {self.quorum}")
        self._recompute_earliest()
        self._recompute_leaders()

    def _recompute_leaders(self) -> None:
        marks = self.clock.symbol_watermarks
        self._leaders = heapq.nlargest(self.quorum, marks, key=marks.__getitem__)

    def set_clock(self, clock: PartitionClock) -> None:
        """Install a clock recovered from the table."""
        self.clock = clock
        self._recompute_leaders()

    def _recompute_earliest(self) -> None:
        self._earliest_end = min((w.end_ms for w in self.open.values()), default=sys.maxsize)

    def restore(self, window: WindowAggregate) -> None:
        """Add a window recovered from the table."""
        self.open[(window.symbol, window.start_ms)] = window
        self._earliest_end = min(self._earliest_end, window.end_ms)

    def window_start(self, ts: int) -> int:
        return ts - ts % self.size_ms

    def is_redelivery(self, offset: int) -> bool:
        """True for a record the restored state has already taken into account."""
        return offset <= self.clock.last_offset

    def apply(self, quote: Quote, offset: int) -> Outcome:
        start = self.window_start(quote.market_timestamp)
        end = start + self.size_ms
        key = (quote.symbol, start)
        window = self.open.get(key)
        if window is not None and offset <= window.last_offset:
            self._advance(quote.symbol, quote.market_timestamp, offset)
            return AlreadyApplied()
        if end <= self._closed_until(quote.symbol):
            return self._late(start, f"window {iso_utc(start)} already flushed (idle)", offset)
        if end + self.grace_ms <= self.clock.watermark_ms:
            return self._late(
                start,
                f"window {iso_utc(start)} closed: watermark {iso_utc(self.clock.watermark_ms)}"
                f" passed window end + {self.grace_ms} ms grace",
                offset,
            )
        conditions = quote.conditions
        priced = conditions is None or self.excluded_conditions.isdisjoint(conditions)
        if window is None:
            window = WindowAggregate.first(quote, start, self.size_ms, offset, priced)
            self.open[key] = window
            self._earliest_end = min(self._earliest_end, end)
        else:
            window.add(quote, offset, priced)
        self._advance(quote.symbol, quote.market_timestamp, offset)
        return Applied(window)

    def _late(self, start: int, reason: str, offset: int) -> Late:
        # A late record does not move the watermark: its time is behind it by definition.
        self.clock.last_offset = max(self.clock.last_offset, offset)
        return Late(start, reason)

    def _advance(self, symbol: str, ts: int, offset: int) -> None:
        clock = self.clock
        if offset > clock.last_offset:
            clock.last_offset = offset
        marks = clock.symbol_watermarks
        if ts <= marks.get(symbol, -1):
            return
        marks[symbol] = ts
        leaders = self._leaders
        if symbol not in leaders:
            if len(leaders) < self.quorum:
                leaders.append(symbol)
            else:
                lowest = min(leaders, key=marks.__getitem__)
                if marks[lowest] >= ts:
                    return
                leaders[leaders.index(lowest)] = symbol
        # The quorum-th highest progress (the lowest leader's), or every symbol's while the
        # partition has fewer symbols than the quorum.
        reached = min(marks[s] for s in leaders)
        if reached > clock.watermark_ms:
            clock.watermark_ms = reached

    def _closed_until(self, symbol: str) -> int:
        clock = self.clock
        return max(clock.closed_until_ms, clock.symbol_closed_until.get(symbol, -1))

    def covers(self, window: WindowAggregate) -> bool:
        """True when this partition's clock has already closed `window`."""
        return (
            window.end_ms <= self._closed_until(window.symbol)
            or window.end_ms + self.grace_ms <= self.clock.watermark_ms
        )

    def closable(self) -> list[WindowAggregate]:
        """Windows the watermark has passed (end + grace), oldest first."""
        limit = self.clock.watermark_ms - self.grace_ms
        if self._earliest_end > limit:
            return []
        due = [w for w in self.open.values() if w.end_ms <= limit]
        due.sort(key=lambda w: (w.start_ms, w.symbol))
        return due

    def flush(self) -> list[WindowAggregate]:
        """Every open window, for an idle partition; later records for them become late, per
        symbol: a flushed window of one symbol closes nothing of another."""
        due = sorted(self.open.values(), key=lambda w: (w.start_ms, w.symbol))
        closed = self.clock.symbol_closed_until
        for window in due:
            closed[window.symbol] = max(closed.get(window.symbol, -1), window.end_ms)
        return due

    def remove(self, windows: list[WindowAggregate]) -> None:
        for window in windows:
            self.open.pop((window.symbol, window.start_ms), None)
        self._recompute_earliest()
