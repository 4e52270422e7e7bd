"""The anomaly agent: `stock-quotes-aggregated` -> per-symbol history -> `stock-anomalies`.

Per batch of closed windows: skip records the stored progress already covers (re-read after a
restart), parse each window (bad -> DLQ, malformed or invalid), judge it against its symbol's
history and fold it in (statistics.py); then, per partition, write the anomalies not already in
the output and wait for the broker (emitter.py), and only then store the changed histories and
the partition's progress (tables/anomaly_state.py). The batch's dead letters are delivered
before the batch ends, i.e. before Faust may commit its offsets.

Input partition p's anomalies go to output partition p, as the aggregation's windows do, which
is how a restarted worker finds what it already emitted. Offsets of a partition must follow
each other: after a restart Faust resumes at the committed offset while the progress is at its
last write, and after a rebalance Faust's stream can skip records; the missing ones are read
directly and processed first (as the aggregation does).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import faust
import orjson
from faust.streams import _current_event

from stockstream.agents.anomaly.emitter import AnomalyEmitter, Identity
from stockstream.agents.anomaly.statistics import Rules, Window, observe
from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.windows import WindowRecordError
from stockstream.deadletter import DeadLetters
from stockstream.kafka.readback import (
    ReadAfter,
    ReadRange,
    read_after,
    read_missing,
    read_range,
)
from stockstream.metrics import AGENT_BATCH_SECONDS
from stockstream.settings import Settings, SettingsError
from stockstream.tables.anomaly_state import AnomalyState, PartitionHistories

log = logging.getLogger(__name__)

# Windows arrive at most once a minute per symbol: small batches keep the latency low.
BATCH_MAX_EVENTS = 500
BATCH_MAX_SECONDS = 0.05
AGENT_NAME = "anomalies"


class AnomalyDetection:
    """The agent's body, with the state it keeps."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        table: Any,
        output: faust.TopicT,
        dead_letters: DeadLetters,
        *,
        read_back: ReadAfter = read_after,
        read_range: ReadRange = read_range,
    ) -> None:
        """`read_back` (an output partition after an offset) and `read_range` (records of an
        input partition) ask the broker; parameters so the rules can be tested alone. Raises
        `SettingsError` for settings that could never judge anything."""
        conf = settings.anomaly
        if conf.min_history > conf.history_windows:
            raise SettingsError(
                f"ANOMALY_MIN_HISTORY: must not exceed ANOMALY_HISTORY_WINDOWS"
                f" ({conf.history_windows}), got {conf.min_history}"
            )
        self.app = app
        self.settings = settings
        self.rules = Rules.from_settings(conf)
        self.state = AnomalyState(table)
        self.emitter = AnomalyEmitter(settings.kafka, output, read_back)
        self.dead_letters = dead_letters.batch()
        self._read_range = read_range
        self._batch_seconds = AGENT_BATCH_SECONDS.labels(AGENT_NAME)

    def register(self, source: faust.ChannelT[Any]) -> None:
        self.app.agent(source, name=AGENT_NAME)(self.process)
        self.app.on_partitions_revoked.connect(self.on_partitions_revoked)  # type: ignore[arg-type]

    async def process(self, stream: Any) -> None:
        # Faust acknowledges a batch's offsets only after this loop body returns: by then its
        # anomalies are acknowledged, its state written and its dead letters delivered.
        async for batch in stream.take_events(BATCH_MAX_EVENTS, within=BATCH_MAX_SECONDS):
            await self.process_batch(batch)

    async def process_batch(self, batch: list[Any]) -> None:
        started = time.perf_counter()
        last_of_partition: dict[int, Any] = {}
        found: dict[int, list[tuple[Identity, dict[str, Any]]]] = {}
        for event in batch:
            _enter(event)
            await self._handle(event.message, found)
            last_of_partition[event.message.partition] = event
        for partition, event in last_of_partition.items():
            _enter(event)
            await self._settle(partition, found.get(partition, []))
        await self.dead_letters.deliver()
        self._batch_seconds.observe(time.perf_counter() - started)

    async def _handle(
        self, message: Any, found: dict[int, list[tuple[Identity, dict[str, Any]]]]
    ) -> None:
        partition, offset = message.partition, message.offset
        histories = await self._partition(partition)
        expected = histories.progress.last_offset + 1
        if 0 < expected < offset:
            kafka, topic = self.settings.kafka, message.topic
            skipped = await read_missing(
                self._read_range, kafka, topic, partition, expected, offset - 1
            )
            for record in skipped:
                await self._apply(record, histories, found)
        await self._apply(message, histories, found)

    async def _apply(
        self,
        message: Any,
        histories: PartitionHistories,
        found: dict[int, list[tuple[Identity, dict[str, Any]]]],
    ) -> None:
        partition, offset = message.partition, message.offset
        progress = histories.progress
        if offset <= progress.last_offset:
            return  # re-read after a restart: the stored state covers it
        progress.last_offset = offset
        try:
            window = self._parse(message)
        except (orjson.JSONDecodeError, WindowRecordError) as exc:
            reason = Reason.INVALID if isinstance(exc, WindowRecordError) else Reason.MALFORMED
            await self.dead_letters.add(message, reason, str(exc))
            return
        try:
            observed = observe(histories.symbols.get(window.symbol), window, self.rules)
        except Exception:
            # Never let one record stop the agent: a bug, logged with the record's
            # coordinates and dead-lettered for inspection.
            log.exception(
                "unexpected error judging a window",
                extra={"topic": message.topic, "partition": partition, "offset": offset},
            )
            await self.dead_letters.add(
                message, Reason.INTERNAL_ERROR, "internal error while processing (see log)"
            )
            return
        if observed is None:
            log.debug(
                "window already folded, skipped",
                extra={"symbol": window.symbol, "partition": partition, "offset": offset},
            )
            return
        histories.symbols[window.symbol] = observed.history
        self.state.mark_dirty(partition, window.symbol)
        if observed.gap:
            log.debug(
                "gap before this window: no one-minute return",
                extra={"symbol": window.symbol, "partition": partition, "offset": offset},
            )
        now_ms = int(time.time() * 1000)
        found.setdefault(partition, []).extend(
            (a.identity, a.record(self.rules.z_threshold, now_ms)) for a in observed.anomalies
        )

    @staticmethod
    def _parse(message: Any) -> Window:
        if message.value is None:
            raise orjson.JSONDecodeError("no value (a tombstone)", "", 0)
        window = Window.from_record(orjson.loads(message.value))
        if message.key != window.symbol.encode():
            shown = None if message.key is None else message.key[:80].decode("utf-8", "replace")
            raise WindowRecordError(f"record key {shown!r} must equal symbol {window.symbol!r}")
        return window

    async def _settle(
        self, partition: int, anomalies: list[tuple[Identity, dict[str, Any]]]
    ) -> None:
        """Emit the partition's anomalies of this batch, then store its histories and progress
        (the caller provides the stream context)."""
        histories = self.state.get(partition)
        if histories is None:  # pragma: no cover - loaded by _handle in this batch
            return
        progress = histories.progress
        if anomalies:
            await self.emitter.emit(partition, progress.emitted_offset, anomalies)
        progress.emitted_offset = self.emitter.index.checkpointed(
            partition, progress.emitted_offset, histories.folded_until
        )
        self.state.write(partition)

    async def _partition(self, partition: int) -> PartitionHistories:
        histories = self.state.get(partition)
        if histories is None:
            histories = self.state.restore(partition)
            # Until what this partition already emitted is known, nothing of it may be
            # processed: the read-back is retried while the broker is away.
            progress = histories.progress
            await self.emitter.load(partition, progress.emitted_offset)
            progress.emitted_offset = self.emitter.index.checkpointed(
                partition, progress.emitted_offset, histories.folded_until
            )
            self.state.register(partition, histories)
            log.info(
                "anomaly partition loaded",
                extra={
                    "topic": self.settings.kafka.aggregated_topic,
                    "partition": partition,
                    "symbols": len(histories.symbols),
                    "offset": progress.last_offset,
                },
            )
        return histories

    async def on_partitions_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        """Drop the state of partitions this worker no longer owns (reloaded if they return)."""
        topic = self.settings.kafka.aggregated_topic
        partitions = {tp.partition for tp in revoked if tp.topic == topic}
        self.state.forget(partitions)
        self.emitter.forget(partitions)


def _enter(event: Any) -> None:
    """Make `event` the current stream event: Faust tables send a change to the changelog
    partition of the current event."""
    _current_event.set(weakref.ref(event))
