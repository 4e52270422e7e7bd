"""The aggregation's idle clock: when a partition that receives nothing closes its windows.

A partition that received nothing for `AGG_IDLE_TIMEOUT_SECONDS` still has to emit its last
windows (end of the trading day, a quiet symbol). Table state may only change inside the
partition's own stream context, so the `idle-ticker` timer does not close windows: it writes a
tick to that partition of the clock topic, which the agent reads together with the quotes, and
the agent asks `IdleClock.idle_for` in the partition's context.

"Received nothing" is checked against the broker, not only against the agent's clock: the
agent must have processed nothing for the timeout AND the partition's end offset must have
stayed at the agent's progress for half of it (a whole timeout when the end is beyond the last
record the agent saw, e.g. a transaction marker). So an agent that was blocked (a rebalance, a
slow start) never flushes windows whose quotes are already waiting, and after a broker outage a
producer has time to drain its spool before anything is called idle. Records still waiting
after a whole timeout were not delivered by the stream: the agent reads them directly before it
flushes anything (agent.py `handle_tick`). During a replay of
recorded quotes the partition is never idle, so no wall-clock rule can close a window early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import faust
import orjson

from stockstream.tables.window_state import WindowState
from stockstream.tables.windows import PartitionWindows

log = logging.getLogger(__name__)

#: The end offset of a quotes partition, from the broker.
EndOffset = Callable[[int], Awaitable[int]]
Owned = Callable[[], set[int]]


class Idle(NamedTuple):
    """A partition found idle: for how long (seconds), and its end offset at that moment."""

    quiet_s: float
    end_offset: int


class IdleClock:
    def __init__(
        self,
        state: WindowState,
        clock_topic: faust.TopicT,
        timeout_seconds: float,
        end_offset: EndOffset,
        owned: Owned,
    ) -> None:
        self._state = state
        self._topic = clock_topic
        self._timeout = timeout_seconds
        self._end_offset = end_offset
        self._owned = owned
        self._last_tick: dict[int, float] = {}
        # Partitions owned but not loaded yet (no record since assignment): the first tick
        # loads them, and a later tick flushes their restored windows if they stay idle.
        self._first_seen: dict[int, float] = {}
        # Per partition: since when (end offset, processed offset) has been what it is.
        self._probes: dict[int, tuple[float, tuple[int, int]]] = {}

    async def idle_for(self, partition: int, windows: PartitionWindows) -> Idle | None:
        """How long the partition has been idle and its end offset then, or None while it
        is not (or cannot be told); called for each tick, in the partition's context."""
        now = time.monotonic()
        quiet = now - self._state.last_activity[partition]
        if quiet < self._timeout / 2:
            return None
        try:
            end = await self._end_offset(partition)
        except Exception as exc:
            # Cannot tell what is waiting: not idle, and count again once it is known.
            self._probes.pop(partition, None)
            log.warning(
                "idle check could not read the end offset",
                extra={"partition": partition, "error": repr(exc)},
            )
            return None
        seen = (end, windows.clock.last_offset)
        probe = self._probes.get(partition)
        if probe is None or probe[1] != seen:
            probe = self._probes[partition] = (now, seen)
        caught_up = windows.clock.last_offset >= end - 1
        settled = now - probe[0] >= (self._timeout / 2 if caught_up else self._timeout)
        if quiet < self._timeout or not settled:
            return None
        del self._probes[partition]
        return Idle(quiet, end)

    async def send_ticks(self) -> None:
        """Tick every owned partition that may be idle: loaded ones with open windows that
        processed nothing for half the timeout (at most a tick per half timeout: it takes two
        looks at the broker to call a partition idle), and partitions not loaded yet, once per
        timeout."""
        now = time.monotonic()
        owned = self._owned()
        for partition in owned:
            windows = self._state.get(partition)
            if windows is None:
                since, every = self._first_seen.setdefault(partition, now), self._timeout
            elif not windows.open:
                continue
            else:
                self._first_seen.pop(partition, None)
                since = self._state.last_activity.get(partition, now)
                every = self._timeout / 2
            if now - since >= every and now - self._last_tick.get(partition, 0.0) >= every:
                self._last_tick[partition] = now
                await self._topic.send(
                    key=b"tick", value=orjson.dumps({"issued_at": time.time()}), partition=partition
                )
                log.debug("idle tick sent", extra={"partition": partition})
        for gone in set(self._first_seen) - owned:
            self._first_seen.pop(gone, None)

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._probes.pop(partition, None)
