"""The aggregation agent: `stock-quotes` -> one-minute windows -> `stock-quotes-aggregated`.

Per record: skip it if the restored state already holds it (redelivered after a crash),
validate it (bad -> DLQ), fold it into its window (late -> DLQ), then close every window the
partition's watermark has passed and emit it exactly once (emitter.py). The window rules are in
tables/windows.py, the durable state in tables/window_state.py. Idle ticks (idle.py) arrive
through the same stream, so a quiet partition's windows close in the same partition context,
with the same bookkeeping.

A batch's dead letters are delivered before the batch ends, i.e. before Faust may commit its
offsets (deadletter.py `DeadLetterBatch`): after the commit the DLQ is their only home.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import TP

from stockstream.agents.aggregate.emitter import WindowEmitter
from stockstream.agents.aggregate.idle import EndOffset, IdleClock
from stockstream.agents.aggregate.lag import ConsumerLag, record_seconds
from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.quotes import ContractError, QuoteValidator
from stockstream.deadletter import DeadLetters
from stockstream.kafka.readback import (
    ReadAfter,
    ReadRange,
    read_after,
    read_missing,
    read_range,
)
from stockstream.kafka.topics import clock_topic_name
from stockstream.metrics import (
    AGENT_BATCH_SECONDS,
    EMIT_LATENCY,
    EVENT_LAG,
    OPEN_WINDOWS,
    QUOTES,
    STREAM_GAP_RECORDS,
    WATERMARK,
    WINDOW_CLOSE_LAG,
    WINDOWS_EMITTED,
    WINDOWS_SUPPRESSED,
)
from stockstream.settings import Settings
from stockstream.tables.window_state import WindowState
from stockstream.tables.windows import AlreadyApplied, Late, PartitionWindows, WindowAggregate

log = logging.getLogger(__name__)

# Labelled metric children resolved once: `.labels()` per quote shows up in profiles.
_APPLIED, _REDELIVERED, _LATE = (QUOTES.labels(o) for o in ("applied", "redelivered", "late"))
_BATCH_SECONDS = AGENT_BATCH_SECONDS.labels("aggregate")
#: Tells the consumer that offsets `first`..`last` of a topic partition were processed.
MarkDone = Callable[[str, int, int, int], Awaitable[None]]
#: Records of a batch folded between two yields to the event loop (about 25 ms of work).
YIELD_EVERY = 1000
#: Records an idle check reads directly at most (per tick) when the stream left them.
UNDELIVERED_READ_MAX = 10_000
#: How often the consumer lag gauges are refreshed (seconds).
LAG_INTERVAL_SECONDS = 5.0


class Aggregation:
    """The agent's body, with the state it keeps."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        table: Any,
        output: faust.TopicT,
        clock: faust.TopicT,
        dead_letters: DeadLetters,
        *,
        read_back: ReadAfter = read_after,
        read_range: ReadRange = read_range,
        end_offset: EndOffset | None = None,
        mark_done: MarkDone | None = None,
    ) -> None:
        """`read_back` (an output partition after an offset), `read_range` (records of a
        quotes partition) and `end_offset` (of a quotes partition) ask the broker; they are
        parameters so the rules can be tested alone."""
        agg = settings.aggregation
        self.app = app
        self.settings = settings
        self.conf = agg
        self._clock_topic = clock_topic_name(settings)
        self.state = WindowState(
            table,
            size_ms=agg.window_seconds * 1000,
            grace_ms=int(agg.grace_seconds * 1000),
            quorum=agg.watermark_quorum,
            excluded_conditions=agg.excluded_condition_codes,
        )
        self.validator = QuoteValidator.from_settings(settings.quotes)
        self._read_range = read_range
        self._mark_done = mark_done or self._consumer_mark_done
        self.emitter = WindowEmitter(settings.kafka, output, read_back)
        self.idle = IdleClock(
            self.state,
            clock,
            agg.idle_timeout_seconds,
            end_offset or self._consumer_end_offset,
            self._owned_partitions,
        )
        self.dead_letters = dead_letters.batch()
        self._watermarks: dict[int, Any] = {}
        # Per batch (_process_batch): its wall-clock and monotonic start, quotes applied.
        self._now, self._active = time.time(), time.monotonic()
        self._applied = 0
        self.lag = ConsumerLag(settings.kafka.quotes_topic, self._high_water)

    def register(self, source: faust.ChannelT[Any]) -> None:
        """Attach the agent, the idle ticker and the revocation hook to the app."""
        self.app.agent(source, name="aggregate")(self.process)
        self.app.timer(self.conf.idle_check_seconds, name="idle-ticker")(self.idle.send_ticks)
        self.app.timer(LAG_INTERVAL_SECONDS, name="lag-meter")(self.measure_lag)
        self.app.on_partitions_revoked.connect(self.on_partitions_revoked)  # type: ignore[arg-type]

    # -- the agent ---------------------------------------------------------------------

    async def process(self, stream: Any) -> None:
        # The source is a BatchedTopic (application.py): each event is one fetch of one
        # partition, and Faust acknowledges its offsets only after this loop body returns, so
        # the window writes deferred to the end of the batch, and the batch's dead letters,
        # are in Kafka before any offset that depends on them can be committed.
        async for event in stream.events():
            await self.process_batch(event)

    async def process_batch(self, event: Any) -> None:
        """Fold one batch: `event.value` holds the records of `event.message`'s partition."""
        started = time.perf_counter()
        try:
            await self._process_batch(event)
        finally:
            _BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _process_batch(self, event: Any) -> None:
        # Clocks and gauges are per batch, not per quote (a batch spans at most one fetch
        # wait): each cost as much as the fold itself in profiles.
        self._now, self._active = time.time(), time.monotonic()
        self._applied = 0
        # Table writes go to the changelog partition of the current event.
        _enter(event)
        message = event.message
        partition, records = message.partition, event.value
        # A batch is one fetch of one topic partition: quotes, or idle ticks.
        handle = self._handle_tick if message.topic == self._clock_topic else self._handle_quote
        for n, record in enumerate(records, 1):
            await handle(record, partition)
            if not n % YIELD_EVERY:
                # A fetch of a backlog is thousands of records: the web view, the health
                # checks and the other services get the loop now and then.
                await asyncio.sleep(0)
        if records:
            last = records[-1]
            self.lag.processed(partition, last.offset, last.timestamp)
        if self._applied:
            _APPLIED.inc(self._applied)
        windows = self.state.get(partition)
        if windows is not None:
            self._watermark_gauge(partition).set(windows.clock.watermark_ms / 1000)
        self.state.write_batch(partition)
        await self.dead_letters.deliver()

    async def _handle_tick(self, message: Any, partition: int) -> None:
        try:
            await self.handle_tick(partition, record_seconds(message.timestamp))
        except Exception:
            self._log_unexpected(message)

    async def _handle_quote(self, message: Any, partition: int) -> None:
        # The hot path: one coroutine per quote, the rest synchronous unless a window closes,
        # a record goes to the DLQ or records are missing.
        try:
            windows = self.state.get(partition)
            if windows is None:
                windows = await self._partition(partition)
            self.state.last_activity[partition] = self._active
            offset = message.offset
            expected = windows.clock.last_offset + 1
            if 0 < expected < offset:
                await self._fill_gap(message.topic, partition, windows, expected, offset - 1)
            await self._apply(message, windows)
        except Exception:
            # Never let one record stop the worker: this is a bug, so it is logged with the
            # record's coordinates and dead-lettered for inspection.
            self._log_unexpected(message)
            await self.dead_letters.add(
                message, Reason.INTERNAL_ERROR, "internal error while processing (see log)"
            )

    @staticmethod
    def _log_unexpected(message: Any) -> None:
        log.exception(
            "unexpected error handling record",
            extra={
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
            },
        )

    async def _fill_gap(
        self, topic: str, partition: int, windows: PartitionWindows, first: int, last: int
    ) -> int:
        """Process the records between the last one processed and this one, read directly.

        Every record of a partition moves its clock's `last_offset`, so offsets must follow
        each other. They do not after a restart (the stream resumes at the committed offset,
        the clock at its last checkpoint: those records are then re-applied idempotently), and
        when Faust's stream skipped records -- seen after a restart, on a rebalance: its
        consumer keeps going past records it did not deliver and treats the hole as
        acknowledged, so they would be committed unprocessed. Offsets that are transaction
        markers yield no record."""
        records = await read_missing(
            self._read_range, self.settings.kafka, topic, partition, first, last
        )
        STREAM_GAP_RECORDS.inc(len(records))
        for record in records:
            await self._apply(record, windows)
        # Processed here, so done for the consumer too: a hole Faust's stream never
        # acknowledges would hold the partition's committed offset back for good (every
        # restart would replay from it).
        await self._mark_done(topic, partition, first, last)
        return len(records)

    async def _apply(self, message: Any, windows: PartitionWindows) -> None:
        if windows.is_redelivery(message.offset):
            _REDELIVERED.inc()
            return
        refused = self._fold(message, windows)
        if refused is not None:
            await self.dead_letters.add(message, *refused)
            return
        due = windows.closable()
        if due:
            partition, since = message.partition, record_seconds(message.timestamp)
            await self.close_windows(partition, windows, due, "watermark", since)

    def _fold(self, message: Any, windows: PartitionWindows) -> tuple[Reason, str] | None:
        """Fold one record into its window: None when folded (or already in it), else the
        reason and error to dead-letter it with."""
        offset = message.offset
        now = self._now
        try:
            quote = self.validator.parse(message.key, message.value, int(now * 1000))
        except ContractError as exc:
            windows.clock.last_offset = offset
            QUOTES.labels(exc.reason.value).inc()
            return exc.reason, exc.error
        outcome = windows.apply(quote, offset)
        if isinstance(outcome, Late):
            _LATE.inc()
            return Reason.LATE, outcome.reason
        if isinstance(outcome, AlreadyApplied):
            _REDELIVERED.inc()
        else:
            self._applied += 1
            EVENT_LAG.observe(max(0.0, now - quote.market_timestamp / 1000))
            self.state.mark_dirty(message.partition, outcome.window)
        return None

    async def handle_tick(self, partition: int, since: float | None = None) -> None:
        """Close every open window of a partition that has been idle (idle.py decides)."""
        windows = await self._partition(partition)
        if not windows.open:
            return
        idle = await self.idle.idle_for(partition, windows)
        if idle is None:
            return
        # Records still waiting after a whole timeout were not delivered by the stream (one
        # that dropped them, its consumer past them): read first, or the windows would go out
        # without them. Offsets without records (transaction markers) read as nothing.
        first = windows.clock.last_offset + 1
        last = min(idle.end_offset - 1, first + UNDELIVERED_READ_MAX - 1)
        topic = self.settings.kafka.quotes_topic
        if first <= last and await self._fill_gap(topic, partition, windows, first, last):
            self.state.last_activity[partition] = time.monotonic()
            return
        log.info(
            "partition idle, flushing windows",
            extra={
                "partition": partition,
                "open_windows": len(windows.open),
                "idle_s": idle.quiet_s,
            },
        )
        await self.close_windows(partition, windows, windows.flush(), "idle", since)

    async def close_windows(
        self,
        partition: int,
        windows: PartitionWindows,
        due: list[WindowAggregate],
        trigger: str,
        since: float | None = None,
    ) -> None:
        """Emit closed windows once, wait for the broker's ack, then checkpoint the close.
        `since`: when they could close (epoch seconds), for the close-lag histogram."""
        if not due:
            return
        started = time.perf_counter()
        clock = windows.clock
        written, highest = await self.emitter.emit(partition, clock.emitted_offset, due)
        if written < len(due):
            WINDOWS_SUPPRESSED.inc(len(due) - written)
        if written:
            WINDOWS_EMITTED.labels(trigger).inc(written)
            EMIT_LATENCY.observe(time.perf_counter() - started)
            if since is not None:
                WINDOW_CLOSE_LAG.observe(max(0.0, time.time() - since))
        clock.emitted_offset = self.emitter.checkpointed(
            partition, due, windows.open, clock.emitted_offset, highest
        )
        self.state.checkpoint(partition, due)
        OPEN_WINDOWS.labels(str(partition)).set(len(windows.open))
        log.debug(
            "windows closed",
            extra={"partition": partition, "closed": len(due), "trigger": trigger},
        )

    async def _partition(self, partition: int) -> PartitionWindows:
        windows = self.state.get(partition)
        if windows is None:
            windows = self.state.restore(partition)
            # Until what this partition already emitted is known, nothing of it may be
            # processed: the read-back is retried while the broker is away.
            clock = windows.clock
            await self.emitter.load(partition, clock.emitted_offset)
            self.state.register(partition, windows)
            log.info(
                "partition loaded",
                extra={
                    "partition": partition,
                    "open_windows": len(windows.open),
                    "watermark_ms": clock.watermark_ms,
                    "offset": clock.last_offset,
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
        self.emitter.forget(partitions)
        self.idle.forget(partitions)
        self.lag.forget(partitions)

    async def measure_lag(self) -> None:
        self.lag.measure(self._owned_partitions())

    def _high_water(self, partition: int) -> int | None:
        highwater = self.app.consumer.highwater(TP(self.settings.kafka.quotes_topic, partition))
        return None if highwater is None else int(highwater)

    def _owned_partitions(self) -> set[int]:
        quotes = self.settings.kafka.quotes_topic
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == quotes}

    async def _consumer_mark_done(self, topic: str, partition: int, first: int, last: int) -> None:
        # Faust's consumer commits through a known gap once a later offset is acknowledged.
        consumer: Any = self.app.consumer
        await consumer._add_gap(TP(topic, partition), first, last)

    async def _consumer_end_offset(self, partition: int) -> int:
        tp = TP(self.settings.kafka.quotes_topic, partition)
        ends = await self.app.consumer.highwaters(tp)
        return int(ends[tp])


def _enter(event: Any) -> None:
    """Make `event` the current stream event: Faust tables send a change to the changelog
    partition of the current event (and RocksDB picks its partition store the same way)."""
    _current_event.set(weakref.ref(event))
