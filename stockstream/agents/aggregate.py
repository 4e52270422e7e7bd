"""The aggregation agent: `stock-quotes` -> one-minute windows -> `stock-quotes-aggregated`.

Per record: skip it if the restored state already holds it (redelivered after a crash),
validate it (bad -> DLQ), fold it into its window (late -> DLQ), then close every window the
partition's watermark has passed. The window rules are in tables/windows.py, the durable state
in tables/window_state.py.

Idle ticks are the wall-clock half of the close rule: a partition that received nothing for
`AGG_IDLE_TIMEOUT_SECONDS` still has to emit its last windows (end of the trading day, a quiet
symbol). Table state may only change inside the partition's own stream context, so the
`idle-ticker` timer does not close windows itself: it writes a tick to that partition of the
clock topic, which this agent reads together with the quotes, and the agent re-checks idleness
in the partition's context. During a replay of recorded quotes the partition is never idle, so
no wall-clock rule can close a window early.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import faust
import orjson
from faust.streams import _current_event

from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.quotes import ContractError, QuoteValidator
from stockstream.deadletter import DeadLetters
from stockstream.kafka.readback import read_after
from stockstream.kafka.topics import clock_topic_name
from stockstream.metrics import (
    EMIT_LATENCY,
    EVENT_LAG,
    OPEN_WINDOWS,
    QUOTES,
    WATERMARK,
    WINDOWS_EMITTED,
    WINDOWS_SUPPRESSED,
)
from stockstream.retry import Backoff, retry
from stockstream.settings import Settings
from stockstream.tables.emitted import EmittedIndex
from stockstream.tables.window_state import WindowState
from stockstream.tables.windows import AlreadyApplied, Late, PartitionWindows, WindowAggregate

log = logging.getLogger(__name__)

# While the broker is unreachable a window is re-sent with this backoff (back-pressure: the
# source offsets are not committed meanwhile, so nothing is lost).
EMIT_BACKOFF = Backoff(initial_seconds=0.5, max_seconds=30.0)
# Labelled metric children resolved once: `.labels()` per quote shows up in profiles.
_APPLIED, _REDELIVERED, _LATE = (QUOTES.labels(o) for o in ("applied", "redelivered", "late"))


class Aggregation:
    """The agent's body and its idle clock, with the state they share."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        table: Any,
        output: faust.TopicT,
        clock: faust.TopicT,
        dead_letters: DeadLetters,
    ) -> None:
        agg = settings.aggregation
        self.app = app
        self.settings = settings
        self.conf = agg
        self.output = output
        self.clock = clock
        self.dead_letters = dead_letters
        self._clock_topic = clock_topic_name(settings)
        self.state = WindowState(
            table, size_ms=agg.window_seconds * 1000, grace_ms=int(agg.grace_seconds * 1000)
        )
        self.validator = QuoteValidator.from_settings(settings.quotes)
        self.emitted = EmittedIndex()
        self._watermarks: dict[int, Any] = {}
        self._last_tick: dict[int, float] = {}
        # Partitions owned but not loaded yet (no record since assignment): the first tick
        # loads them, and a later tick flushes their restored windows if they stay idle.
        self._first_seen: dict[int, float] = {}

    def register(self, source: faust.ChannelT[Any]) -> None:
        """Attach the agent, the idle ticker and the revocation hook to the app."""
        self.app.agent(source, name="aggregate")(self.process)
        self.app.timer(self.conf.idle_check_seconds, name="idle-ticker")(self.send_idle_ticks)
        self.app.on_partitions_revoked.connect(self.on_partitions_revoked)  # type: ignore[arg-type]

    # -- the agent ---------------------------------------------------------------------

    async def process(self, stream: Any) -> None:
        # Batches: Faust acknowledges a batch's offsets only after this loop body returns, so
        # the window writes deferred to the end of the batch are in the changelog before any
        # offset that depends on them can be committed.
        conf = self.conf
        async for batch in stream.take_events(conf.batch_max_events, within=conf.batch_max_seconds):
            last_of_partition: dict[int, Any] = {}
            for event in batch:
                _enter(event)
                await self._handle(event)
                last_of_partition[event.message.partition] = event
            for partition in self.state.dirty_partitions():
                event = last_of_partition.get(partition)
                if event is None:  # pragma: no cover - dirty windows come from this batch
                    continue
                _enter(event)
                self.state.write_dirty(partition)

    async def _handle(self, event: Any) -> None:
        message = event.message
        is_tick = message.topic == self._clock_topic
        try:
            if is_tick:
                await self.handle_tick(message.partition)
            else:
                await self.handle_quote(message)
        except Exception:
            # Never let one record stop the worker: this is a bug, so it is logged with the
            # record's coordinates and dead-lettered for inspection.
            log.exception(
                "unexpected error handling record",
                extra={
                    "topic": message.topic,
                    "partition": message.partition,
                    "offset": message.offset,
                },
            )
            if not is_tick:
                await self.dead_letters.send(
                    message,
                    Reason.INTERNAL_ERROR,
                    "internal error while processing (see worker log)",
                )

    async def handle_quote(self, message: Any) -> None:
        partition, offset = message.partition, message.offset
        windows = await self._partition(partition)
        self.state.last_activity[partition] = time.monotonic()
        if windows.is_redelivery(offset):
            _REDELIVERED.inc()
            return
        now = time.time()
        try:
            quote = self.validator.parse(message.key, message.value, int(now * 1000))
        except ContractError as exc:
            windows.clock.last_offset = offset
            QUOTES.labels(exc.reason.value).inc()
            await self.dead_letters.send(message, exc.reason, exc.error)
            return
        outcome = windows.apply(quote, offset)
        if isinstance(outcome, Late):
            _LATE.inc()
            await self.dead_letters.send(message, Reason.LATE, outcome.reason)
            return
        if isinstance(outcome, AlreadyApplied):
            _REDELIVERED.inc()
        else:
            _APPLIED.inc()
            EVENT_LAG.observe(max(0.0, now - quote.market_timestamp / 1000))
            self.state.mark_dirty(partition, outcome.window)
        self._watermark_gauge(partition).set(windows.clock.watermark_ms / 1000)
        await self.close_windows(partition, windows, windows.closable(), "watermark")

    async def handle_tick(self, partition: int) -> None:
        """Close every open window of a partition that has been idle for the idle timeout."""
        windows = await self._partition(partition)
        idle_for = time.monotonic() - self.state.last_activity[partition]
        if idle_for < self.conf.idle_timeout_seconds or not windows.open:
            return
        log.info(
            "partition idle, flushing windows",
            extra={"partition": partition, "open_windows": len(windows.open), "idle_s": idle_for},
        )
        await self.close_windows(partition, windows, windows.flush(), "idle")

    async def close_windows(
        self, partition: int, windows: PartitionWindows, due: list[WindowAggregate], trigger: str
    ) -> None:
        """Emit closed windows once, wait for the broker's ack, then checkpoint the close."""
        if not due:
            return
        started = time.perf_counter()
        pending = []
        for window in due:
            if self.emitted.emitted(partition, window):
                WINDOWS_SUPPRESSED.inc()
                continue
            pending.append(self._emit(window, partition))
            self.emitted.mark(partition, window)
        metadata = await asyncio.gather(*pending)
        if metadata:
            windows.clock.emitted_offset = max(
                windows.clock.emitted_offset, max(m.offset for m in metadata)
            )
            WINDOWS_EMITTED.labels(trigger).inc(len(metadata))
            EMIT_LATENCY.observe(time.perf_counter() - started)
        self.state.checkpoint(partition, due)
        OPEN_WINDOWS.labels(str(partition)).set(len(windows.open))
        log.debug(
            "windows closed",
            extra={"partition": partition, "closed": len(due), "trigger": trigger},
        )

    async def _emit(self, window: WindowAggregate, partition: int) -> Any:
        """Write one window to its output partition and wait for the broker's ack."""

        async def send() -> Any:
            delivery = await self.output.send(
                key=window.symbol.encode(),
                value=orjson.dumps(window.to_record()),
                partition=partition,
                # No event-time record timestamp: the broker's time-based retention would
                # delete the windows of a replay (old event times) at once. Event time is in
                # the payload.
            )
            return await delivery

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            log.error(
                "emit failed, retrying",
                extra={
                    "partition": partition,
                    "symbol": window.symbol,
                    "attempt": retries,
                    "retry_in_s": round(pause, 3),
                    "error": repr(exc),
                },
            )

        # Broker errors surface as many aiokafka types: every error is retried.
        return await retry(send, EMIT_BACKOFF, what="emit", on_failure=failed)

    async def _partition(self, partition: int) -> PartitionWindows:
        windows = self.state.get(partition)
        if windows is None:
            windows = self.state.load(partition)
            output = self.settings.kafka.aggregated_topic
            records, last = await read_after(
                self.settings.kafka, output, partition, windows.clock.emitted_offset
            )
            self.emitted.recover(output, partition, records)
            windows.clock.emitted_offset = last
            log.info(
                "partition loaded",
                extra={
                    "partition": partition,
                    "open_windows": len(windows.open),
                    "watermark_ms": windows.clock.watermark_ms,
                    "offset": windows.clock.last_offset,
                    "emitted_since_checkpoint": len(records),
                },
            )
        return windows

    def _watermark_gauge(self, partition: int) -> Any:
        gauge = self._watermarks.get(partition)
        if gauge is None:
            gauge = self._watermarks[partition] = WATERMARK.labels(str(partition))
        return gauge

    async def on_partitions_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        """Drop the state of partitions this worker no longer owns (reloaded if they return)."""
        quotes = self.settings.kafka.quotes_topic
        partitions = {tp.partition for tp in revoked if tp.topic == quotes}
        self.state.forget(partitions)
        self.emitted.forget(partitions)

    # -- the idle clock ----------------------------------------------------------------

    def _owned_partitions(self) -> set[int]:
        quotes = self.settings.kafka.quotes_topic
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == quotes}

    async def send_idle_ticks(self) -> None:
        """Tick every owned partition that has been idle for the idle timeout (at most one
        tick per partition per timeout)."""
        timeout = self.conf.idle_timeout_seconds
        now = time.monotonic()
        owned = self._owned_partitions()
        for partition in owned:
            windows = self.state.get(partition)
            if windows is None:
                since = self._first_seen.setdefault(partition, now)
            elif not windows.open:
                continue
            else:
                self._first_seen.pop(partition, None)
                since = self.state.last_activity.get(partition, now)
            due = now - since >= timeout
            if due and now - self._last_tick.get(partition, 0.0) >= timeout:
                self._last_tick[partition] = now
                await self.clock.send(
                    key=b"tick", value=orjson.dumps({"issued_at": time.time()}), partition=partition
                )
                log.debug("idle tick sent", extra={"partition": partition})
        for gone in set(self._first_seen) - owned:
            self._first_seen.pop(gone, None)


def _enter(event: Any) -> None:
    """Make `event` the current stream event: Faust tables send a change to the changelog
    partition of the current event (and RocksDB picks its partition store the same way)."""
    _current_event.set(weakref.ref(event))
