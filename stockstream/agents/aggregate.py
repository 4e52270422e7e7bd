"""The aggregation agent: `stock-quotes` -> one-minute windows -> `stock-quotes-aggregated`.

Per record: skip it if the restored state already holds it (replay after a crash), validate it
(bad -> DLQ), fold it into its window (late -> DLQ), then close every window the partition's
watermark has passed. Idle ticks from agents/idle.py arrive through the same stream, so a quiet
partition's windows are closed in the same partition context, with the same bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import orjson
from faust.streams import _current_event

from stockstream.application import (
    aggregated_topic,
    aggregation_input,
    app,
    dlq_topic,
    settings,
    window_table,
)
from stockstream.contracts import ContractError, QuoteValidator, Reason
from stockstream.deadletter import send_dead_letter
from stockstream.metrics import (
    EMIT_LATENCY,
    EVENT_LAG,
    OPEN_WINDOWS,
    QUOTES,
    WATERMARK,
    WINDOWS_EMITTED,
    WINDOWS_SUPPRESSED,
)
from stockstream.tables.emitted import emitted_since
from stockstream.tables.window_state import WindowState
from stockstream.tables.windows import AlreadyApplied, Late, PartitionWindows, WindowAggregate
from stockstream.topics import bootstrap_list, clock_topic_name

log = logging.getLogger(__name__)

_agg = settings.aggregation
state = WindowState(
    window_table, size_ms=_agg.window_seconds * 1000, grace_ms=int(_agg.grace_seconds * 1000)
)
validator = QuoteValidator(_agg.symbol_pattern, int(_agg.max_future_seconds * 1000))
# Per source partition: newest window start per symbol already in the output topic.
emitted_through: dict[int, dict[str, int]] = {}
_CLOCK_TOPIC = clock_topic_name(settings)
_RETRY_MAX_SECONDS = 30.0
# Labelled metric children resolved once: `.labels()` per quote shows up in profiles.
_APPLIED, _REPLAYED, _LATE = (QUOTES.labels(o) for o in ("applied", "replayed", "late"))
_watermarks: dict[int, Any] = {}


def _watermark_gauge(partition: int) -> Any:
    gauge = _watermarks.get(partition)
    if gauge is None:
        gauge = _watermarks[partition] = WATERMARK.labels(str(partition))
    return gauge


async def _partition(partition: int) -> PartitionWindows:
    windows = state.get(partition)
    if windows is None:
        windows = state.load(partition)
        newest, last = await emitted_since(
            bootstrap_list(settings),
            settings.kafka.aggregated_topic,
            partition,
            windows.clock.emitted_offset,
        )
        emitted_through[partition] = newest
        windows.clock.emitted_offset = last
        log.info(
            "partition loaded",
            extra={
                "partition": partition,
                "open_windows": len(windows.open),
                "watermark_ms": windows.clock.watermark_ms,
                "offset": windows.clock.last_offset,
            },
        )
    return windows


async def _send_with_retry(window: WindowAggregate, partition: int) -> Any:
    """Write one window to its output partition; retries while the broker is unreachable
    (back-pressure: the source offset is not committed meanwhile, so nothing is lost)."""
    delay = 0.5
    while True:
        try:
            fut = await aggregated_topic.send(
                key=window.symbol.encode(),
                value=orjson.dumps(window.to_record()),
                partition=partition,
                # No event-time record timestamp: the broker's time-based retention would
                # delete replayed (old) windows at once. Event time is in the payload.
            )
            return await fut
        except Exception as exc:  # broker errors surface as many aiokafka types
            log.error(
                "emit failed, retrying",
                extra={"partition": partition, "symbol": window.symbol, "error": repr(exc)},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_SECONDS)


async def close_windows(
    partition: int, windows: PartitionWindows, due: list[WindowAggregate], trigger: str
) -> None:
    """Emit closed windows once, wait for the broker's ack, then checkpoint the close."""
    if not due:
        return
    started = time.perf_counter()
    newest = emitted_through.setdefault(partition, {})
    pending = []
    for window in due:
        if window.start_ms <= newest.get(window.symbol, -1):
            WINDOWS_SUPPRESSED.inc()
            continue
        pending.append(_send_with_retry(window, partition))
        newest[window.symbol] = window.start_ms
    metadata = await asyncio.gather(*pending)
    if metadata:
        windows.clock.emitted_offset = max(
            windows.clock.emitted_offset, max(m.offset for m in metadata)
        )
        WINDOWS_EMITTED.labels(trigger).inc(len(metadata))
        EMIT_LATENCY.observe(time.perf_counter() - started)
    state.checkpoint(partition, due)
    OPEN_WINDOWS.labels(str(partition)).set(len(windows.open))
    log.debug(
        "windows closed",
        extra={"partition": partition, "closed": len(due), "trigger": trigger},
    )


async def handle_quote(event: Any) -> None:
    message = event.message
    partition, offset = message.partition, message.offset
    windows = await _partition(partition)
    state.last_activity[partition] = time.monotonic()
    if windows.is_replay(offset):
        _REPLAYED.inc()
        return
    now = time.time()
    try:
        quote = validator.parse(message.key, message.value, int(now * 1000))
    except ContractError as exc:
        windows.clock.last_offset = offset
        QUOTES.labels(exc.reason.value).inc()
        await send_dead_letter(
            dlq_topic,
            key=message.key,
            value=message.value,
            topic=message.topic,
            partition=partition,
            offset=offset,
            reason=exc.reason,
            error=exc.error,
        )
        return
    outcome = windows.apply(quote, offset)
    if isinstance(outcome, Late):
        _LATE.inc()
        await send_dead_letter(
            dlq_topic,
            key=message.key,
            value=message.value,
            topic=message.topic,
            partition=partition,
            offset=offset,
            reason=Reason.LATE,
            error=outcome.reason,
        )
        return
    if isinstance(outcome, AlreadyApplied):
        _REPLAYED.inc()
    else:
        _APPLIED.inc()
        EVENT_LAG.observe(max(0.0, now - quote.market_timestamp / 1000))
        state.mark_dirty(partition, outcome.window)
    _watermark_gauge(partition).set(windows.clock.watermark_ms / 1000)
    await close_windows(partition, windows, windows.closable(), "watermark")


async def handle_tick(event: Any) -> None:
    """Close every open window of a partition that has been idle for the idle timeout."""
    partition = event.message.partition
    windows = await _partition(partition)
    idle_for = time.monotonic() - state.last_activity[partition]
    if idle_for < _agg.idle_timeout_seconds or not windows.open:
        return
    log.info(
        "partition idle, flushing windows",
        extra={"partition": partition, "open_windows": len(windows.open), "idle_s": idle_for},
    )
    await close_windows(partition, windows, windows.flush(), "idle")


def _enter(event: Any) -> None:
    """Make `event` the current stream event: Faust tables send a change to the changelog
    partition of the current event (and RocksDB picks its partition store the same way)."""
    _current_event.set(weakref.ref(event))


@app.agent(aggregation_input, name="aggregate")
async def aggregate(stream: Any) -> None:
    # Batches: Faust acknowledges a batch's offsets only after this loop body returns, so the
    # window writes deferred to the end of the batch are in the changelog before any offset
    # that depends on them can be committed.
    async for batch in stream.take_events(_agg.batch_max_events, within=_agg.batch_max_seconds):
        last_of_partition: dict[int, Any] = {}
        for event in batch:
            _enter(event)
            await _handle(event)
            last_of_partition[event.message.partition] = event
        for partition in state.dirty_partitions():
            event = last_of_partition.get(partition)
            if event is None:  # pragma: no cover - dirty windows come from this batch's events
                continue
            _enter(event)
            state.write_dirty(partition)


async def _handle(event: Any) -> None:
    try:
        if event.message.topic == _CLOCK_TOPIC:
            await handle_tick(event)
        else:
            await handle_quote(event)
    except Exception:
        # Never let one record stop the worker: this is a bug, so it is logged with the
        # record's coordinates and dead-lettered for inspection.
        message = event.message
        log.exception(
            "unexpected error handling record",
            extra={
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
            },
        )
        if message.topic != _CLOCK_TOPIC:
            await send_dead_letter(
                dlq_topic,
                key=message.key,
                value=message.value,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                reason=Reason.INTERNAL_ERROR,
                error="internal error while processing (see worker log)",
            )


@app.on_partitions_revoked.connect  # type: ignore[arg-type]
async def _on_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
    partitions = {tp.partition for tp in revoked if tp.topic == settings.kafka.quotes_topic}
    state.forget(partitions)
    for partition in partitions:
        emitted_through.pop(partition, None)
