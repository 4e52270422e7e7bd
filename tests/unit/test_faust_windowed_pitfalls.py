"""Executable proof of three pitfalls of faust-streaming 0.15 windowed tables.

stockstream computes its one-minute aggregates with its own window engine
(``stockstream/tables``) instead of faust's built-in windowed tables
(``app.Table(...).tumbling(60, expires=...)`` with ``on_window_close``).
These tests pin down *why*.  They drive a real faust agent (in-memory store,
no broker is ever contacted) so that the table sees the event's real partition
and timestamp, and then run the table's cleanup pass
(``Collection._del_old_keys``) by hand with a controlled wall clock:

1. Windows close on WALL-CLOCK time, not event time.  A replay of month-old
   ticks has its windows closed on the very next cleanup although the
   event-time stream never reached the window end; conversely a window whose
   event-time end passed an hour ago stays open until the wall clock passes it.
2. ``last_closed_window`` is ONE float shared by all partitions.  Once
   partition 0 closes a window that starts later than a window still pending
   on partition 1, partition 1's window is deleted WITHOUT ``on_window_close``.
3. A late event for an already closed window silently re-creates the key with
   a fresh aggregate, and the next cleanup deletes it again without callback,
   exception, log record or sensor call.

stockstream's own engine must not have any of these behaviours.  Every test
asserts the faulty behaviour *exactly*, so it fails -- and this file should be
revisited -- if faust ever fixes it.  The responsible faust code is ``faust/tables/base.py``:

* ``Collection._del_old_keys`` (line numbers of 0.15.3):
  ``window.stale(timestamps[0], time.time())`` (l. 388, wall clock),
  ``if key_to_remove[1][0] > self.last_closed_window`` (l. 429, the only gate
  for ``on_window_close``) and ``self.last_closed_window = max(...)``
  (l. 438, updated for every partition, read by every partition);
* ``Collection._maybe_set_key_ttl`` (l. 451): schedules every written key,
  late or not (called from ``Table.on_key_set`` in faust/tables/table.py);
* ``Collection.__init__``: ``self.last_closed_window = 0.0`` (l. 152, one per
  table, not per partition).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import faust
import faust.tables.base as faust_tables_base
import pytest
from faust.types import FieldDescriptorT

# A wall-clock instant aligned to a minute boundary: 1_699_999_980 = 28_333_333 * 60.
T0 = 1_699_999_980.0
MINUTE = 60.0
DAY = 86_400.0
EXPIRES = 60.0  # grace period handed to ``tumbling(..., expires=...)``

# faust's tumbling window ranges are ``(start, start + size - 0.1)``
# (``HoppingWindow.ranges`` in faust/windows.py and faust/_cython/windows.pyx).
_RANGE_END_OFFSET = MINUTE - 0.1

WindowKey = tuple[Any, tuple[float, float]]


def window_key(symbol: str, start: float) -> WindowKey:
    """The table key faust uses for ``symbol`` in the window starting at ``start``."""
    return (symbol, (start, start + _RANGE_END_OFFSET))


class Tick(faust.Record, serializer="json"):
    symbol: str
    ts: float  # event time carried in the payload (used with relative_to_field)
    volume: int


class WallClock:
    """Replacement for the ``time`` module inside ``faust.tables.base``.

    ``_del_old_keys`` calls ``time.time()``; callable too in case faust ever
    switches to ``from time import time``.
    """

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall_clock(monkeypatch: pytest.MonkeyPatch) -> WallClock:
    clock = WallClock(T0)
    monkeypatch.setattr(faust_tables_base, "time", clock)
    return clock


class TableDelRecorder(faust.Sensor):
    """Records every table deletion reported to the app's sensors (metrics)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deleted: list[Any] = []

    def on_table_del(self, table: Any, key: Any) -> None:
        self.deleted.append(key)


@dataclass
class Harness:
    app: faust.App
    table: Any  # faust.tables.wrappers.WindowWrapper
    agent: Any  # faust.agents.Agent
    closed: list[tuple[WindowKey, Any]] = field(default_factory=list)

    @property
    def collection(self) -> Any:
        """The underlying ``faust.Table`` (owner of ``_del_old_keys``)."""
        return self.table.table

    def stored(self) -> dict[WindowKey, Any]:
        """Snapshot of the table store (memory:// store keeps a plain dict)."""
        return dict(self.collection.data.items())

    async def cleanup(self) -> None:
        """One pass of the periodic cleanup task (``Collection._clean_data``)."""
        await self.collection._del_old_keys()


def _build_harness(relative_to: str) -> Harness:
    app = faust.App(
        f"pitfalls-{uuid.uuid4().hex}",
        # faust-streaming 0.15 has no ``memory://`` transport; a kafka URL is
        # never contacted because the app/consumer/producer is never started.
        broker="kafka://localhost:1",
        store="memory://",
    )
    closed: list[tuple[WindowKey, Any]] = []

    def on_window_close(key: WindowKey, value: Any) -> None:
        closed.append((key, value))

    ticks = app.topic("ticks", value_type=Tick, partitions=2)
    windowed = app.Table(
        "volume_1m", default=int, partitions=2, on_window_close=on_window_close
    ).tumbling(MINUTE, expires=EXPIRES)
    if relative_to == "stream":
        table = windowed.relative_to_stream()  # event time = message timestamp
    else:
        # event time = payload field (``Tick.ts`` is a FieldDescriptor at class level)
        table = windowed.relative_to_field(cast(FieldDescriptorT[float], Tick.ts))

    async def volume_1m(stream: Any) -> AsyncIterator[Tick]:
        async for tick in stream:
            table[tick.symbol] += tick.volume
            yield tick

    agent = app.agent(ticks, name=f"volume_1m_{uuid.uuid4().hex}")(volume_1m)
    return Harness(app=app, table=table, agent=agent, closed=closed)


def _close_consumer_thread_loop(app: faust.App) -> None:
    """Close the private event loop of the never-started consumer thread.

    Stream iteration instantiates (but never starts) the app's aiokafka
    consumer, whose ``AIOKafkaConsumerThread`` creates its own event loop;
    close it so the test does not leak sockets (ResourceWarning).
    """
    consumer = getattr(app, "_consumer", None)
    thread = getattr(consumer, "_thread", None)
    loop = getattr(thread, "thread_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not (loop.is_running() or loop.is_closed()):
        loop.close()


@pytest.fixture
def make_harness() -> Iterator[Callable[[str], Harness]]:
    """Factory for a fresh app/table/agent; ``relative_to`` is "stream" or "field"."""
    built: list[Harness] = []

    def factory(relative_to: str) -> Harness:
        harness = _build_harness(relative_to)
        built.append(harness)
        return harness

    yield factory
    for harness in built:
        _close_consumer_thread_loop(harness.app)


async def put_tick(agent_ctx: Any, symbol: str, ts: float, volume: int, partition: int) -> None:
    """Feed one tick through real stream iteration (message ts == payload ts)."""
    await agent_ctx.put(
        Tick(symbol=symbol, ts=ts, volume=volume),
        key=symbol,
        partition=partition,
        timestamp=ts,
    )


@pytest.fixture
def faust_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


# --------------------------------------------------------------------------
# 1. Window closing is driven by wall clock, not by event time
# --------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("relative_to", ["stream", "field"])
async def test_replayed_window_closes_on_wall_clock_before_event_time_reaches_its_end(
    wall_clock: WallClock, make_harness: Callable[[str], Harness], relative_to: str
) -> None:
    h = make_harness(relative_to)
    month_ago = T0 - 30 * DAY  # minute-aligned too
    wall_clock.now = T0  # "today": we are replaying last month's ticks

    async with h.agent.test_context() as agent_ctx:
        # Event time only reaches month_ago + 30s: the window
        # [month_ago, month_ago + 60) is still in progress in event time,
        # more ticks for it are due in the replay.
        await put_tick(agent_ctx, "AAPL", month_ago + 5, 100, partition=0)
        await put_tick(agent_ctx, "AAPL", month_ago + 30, 50, partition=0)
        assert h.stored() == {window_key("AAPL", month_ago): 150}
        # faust's own per-partition event-time watermark is the window end;
        # it never went past it.
        assert h.collection._partition_latest_timestamp[0] == month_ago + _RANGE_END_OFFSET

        await h.cleanup()

    # BUG (faust/tables/base.py, Collection._del_old_keys):
    #   ``window.stale(timestamps[0], time.time())`` compares the window end with
    #   the WALL clock, so the window is closed and evicted mid-window, as soon
    #   as the cleanup timer fires.  An event-time engine would keep it open.
    assert h.closed == [(window_key("AAPL", month_ago), 150)]
    assert h.stored() == {}


@pytest.mark.asyncio
async def test_window_stays_open_after_event_time_passed_until_wall_clock_passes(
    wall_clock: WallClock, make_harness: Callable[[str], Harness]
) -> None:
    h = make_harness("stream")
    wall_clock.now = T0 + 65  # wall clock: just after the first minute

    async with h.agent.test_context() as agent_ctx:
        await put_tick(agent_ctx, "AAPL", T0 + 5, 100, partition=0)
        # Event time on the same partition jumps one hour ahead (e.g. a
        # simulation/backtest feed, or a producer whose clock runs ahead):
        # the first window's end (T0 + 60) + grace (60s) is long past in
        # event time.
        await put_tick(agent_ctx, "AAPL", T0 + 3600 + 5, 7, partition=0)
        assert h.collection._partition_latest_timestamp[0] == T0 + 3600 + _RANGE_END_OFFSET

        await h.cleanup()
        # BUG (faust/tables/base.py, Collection._del_old_keys): staleness is
        # ``window.stale(range_end, time.time())``; event time is never
        # consulted, so the window whose event-time end passed an hour ago
        # stays open.
        assert h.closed == []
        assert h.stored() == {
            window_key("AAPL", T0): 100,
            window_key("AAPL", T0 + 3600): 7,
        }

        # No new event at all -- only the wall clock moves past
        # T0 + 60 + EXPIRES: now (and only now) the first window closes.
        wall_clock.now = T0 + 2 * MINUTE
        await h.cleanup()

    assert h.closed == [(window_key("AAPL", T0), 100)]
    assert h.stored() == {window_key("AAPL", T0 + 3600): 7}


# --------------------------------------------------------------------------
# 2. One ``last_closed_window`` shared by all partitions
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_shared_last_closed_window_drops_other_partitions_pending_window(
    wall_clock: WallClock,
    make_harness: Callable[[str], Harness],
    faust_logs: pytest.LogCaptureFixture,
) -> None:
    h = make_harness("stream")
    wall_clock.now = T0 + 3 * MINUTE  # both windows below are past end + grace

    async with h.agent.test_context() as agent_ctx:
        # Partition 0 is slightly ahead of partition 1 (normal between
        # partitions): it has a tick in the SECOND minute ...
        await put_tick(agent_ctx, "AAPL", T0 + MINUTE + 5, 100, partition=0)
        # ... while partition 1 still has its FIRST minute pending.  Each
        # partition is perfectly in order.
        await put_tick(agent_ctx, "MSFT", T0 + 5, 40, partition=1)

        assert h.stored() == {
            window_key("AAPL", T0 + MINUTE): 100,
            window_key("MSFT", T0): 40,
        }
        assert h.collection.last_closed_window == 0.0
        # Cleanup walks partitions in insertion order: 0 first, then 1.
        assert list(h.collection._partition_timestamps) == [0, 1]

        faust_logs.clear()
        await h.cleanup()
        cleanup_logs = list(faust_logs.records)

    # BUG (faust/tables/base.py, Collection._del_old_keys):
    #   partition 0 closes [T0+60, T0+120) and sets the table-wide
    #   ``self.last_closed_window = max(self.last_closed_window, T0 + 60)``;
    #   partition 1's [T0, T0+60) is then popped from ``self.data`` but the
    #   callback is gated by ``if key_to_remove[1][0] > self.last_closed_window``
    #   (T0 > T0 + 60 is False), so MSFT's minute vanishes without
    #   ``on_window_close``.  A per-partition watermark would have emitted it.
    assert h.closed == [(window_key("AAPL", T0 + MINUTE), 100)]
    assert h.collection.last_closed_window == T0 + MINUTE
    assert window_key("MSFT", T0) not in h.stored()
    assert h.stored() == {}
    # ... and silently: the cleanup pass emitted not a single log record.
    assert cleanup_logs == []


# --------------------------------------------------------------------------
# 3. Late events: re-created, then dropped without trace
# --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_late_event_for_closed_window_is_dropped_silently(
    wall_clock: WallClock,
    make_harness: Callable[[str], Harness],
    faust_logs: pytest.LogCaptureFixture,
) -> None:
    h = make_harness("stream")
    metrics = TableDelRecorder()
    h.app.sensors.add(metrics)
    wall_clock.now = T0 + 2 * MINUTE

    async with h.agent.test_context() as agent_ctx:
        await put_tick(agent_ctx, "AAPL", T0 + 5, 100, partition=0)
        await h.cleanup()
        assert h.closed == [(window_key("AAPL", T0), 100)]
        assert h.stored() == {}

        # A late tick for the closed minute arrives (producer retry, slow
        # partition...).  It is processed without any error -- put() would
        # re-raise if the agent had crashed.
        await put_tick(agent_ctx, "AAPL", T0 + 10, 25, partition=0)

        # BUG (faust/tables/base.py, Collection._maybe_set_key_ttl via
        # Table.on_key_set): nothing checks ``last_closed_window`` on write;
        # the closed window's key is re-created from ``default()`` (25, not
        # 125) and scheduled for expiry again.
        assert h.stored() == {window_key("AAPL", T0): 25}
        assert h.collection._partition_timestamps[0] == [T0 + _RANGE_END_OFFSET]

        faust_logs.clear()
        metrics.deleted.clear()
        await h.cleanup()  # must not raise
        cleanup_logs = list(faust_logs.records)

    # BUG (faust/tables/base.py, Collection._del_old_keys): the re-created key
    # is popped from ``self.data`` but ``on_window_close`` is skipped because
    # ``key_to_remove[1][0] > self.last_closed_window`` is ``T0 > T0``.
    # No callback, no exception, no log record, no sensor (metric) call:
    # the late volume is lost without a trace.
    assert h.closed == [(window_key("AAPL", T0), 100)]
    assert h.stored() == {}
    assert cleanup_logs == []
    assert metrics.deleted == []
