"""Faust's Kafka transport with an idempotent producer, a short fetch wait and a leaner
delivery loop.

Idempotent producer: faust-streaming 0.15 enables producer idempotence only inside
transactions. With at-least-once processing its producer is therefore not idempotent: when an
acknowledgement is lost, aiokafka sends the batch again and the broker writes it twice -- a
window or a dead letter duplicated without any crash. `IdempotentProducer` asks for
`enable_idempotence` (and `acks=all`, which it requires) always, so the broker drops the
repeated batch.

Fetch wait: see `FETCH_MAX_WAIT_MS` and STOCKSTREAM_FETCH_MAX_WAIT_SECONDS.

Delivery loop: records of a `BatchedTopic` go out one `RecordBatch` per partition and fetch
(kafka/record_batches.py), and a batch's acknowledgement counts for each of its records.
Faust hands each other fetched record to the streams with
`wait_first(deliver(record), suspend_flow.wait())`, so that a delivery blocked by a full
stream buffer, the producer's buffer or flow control (a rebalance) is abandoned when the flow
is suspended. `wait_first` creates four tasks per record and cancels three, and that was a
third of a minimal agent's time (README.md, "Performance"). Almost
every delivery completes without blocking, so `LeanConsumer` runs it one step inline and only
a delivery that does block goes on under `wait_first`, exactly as in Faust. Everything else
(gap tracking, read offsets, commit_every, the periodic yield, the stop after a rebalance) is
Faust's loop unchanged. A batched topic's records skip Faust's per-record conversion too: a
batch holds them as the Kafka client returned them.

Streams and recovery: a stream drops (and acknowledges) every event it takes while
`app.flow_control` is suspended, and every `flow_control.resume()` empties the streams'
queues, even when flow control was not suspended. A recovery resumes flow control to read the
changelogs, then resumes the stream partitions, seeks them to their committed offsets and only
then resumes flow control again (and the consumer's flow). A fetch returning stream records
while that seek is awaited is delivered by Faust's loop into queues about to be emptied: the
consumer's position is past those records and nothing of them was processed (a restored worker
lost the quotes of two of its three partitions that way in about one run in three,
tests/integration/test_state_upgrade.py). `LeanConsumer` holds such a fetch from the moment
stream partitions are resumed until the consumer's flow is resumed after them, then delivers
it from the read offsets the seek set, or drops it when a rebalance came first (its recovery
seeks again).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Coroutine, Generator, Mapping
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service

from stockstream.kafka.record_batches import RecordBatch, is_batched
from stockstream.settings import Settings

#: The broker's longest wait before answering a fetch, unless the app's settings say
#: otherwise (STOCKSTREAM_FETCH_MAX_WAIT_SECONDS). Faust fixes it at 1,500 ms, and a live
#: quote then waited about that long before the agent saw it: at 2,000 quotes/s the close
#: latency was p50 1.2 s, p99 1.3 s with it and p50 0.36 s, p99 0.56 s with 50 ms
#: (benchmarks/live_pipeline.py). A short wait only costs empty fetches while idle.
FETCH_MAX_WAIT_MS = 100
#: How often a fetch held for the app's flow control looks at it again.
FLOW_CHECK_SECONDS = 0.05


def fetch_max_wait_ms(app: Any) -> int:
    """The fetch wait for `app`'s consumer: its settings' (the worker) or the default (a bare
    Faust app on this transport, as in benchmarks/)."""
    settings: Settings | None = getattr(app, "settings", None)
    if settings is None:
        return FETCH_MAX_WAIT_MS
    return max(1, round(settings.worker.fetch_max_wait_seconds * 1000))


class IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Resumed:
    """The rest of a coroutine that was stepped once by hand and is waiting on `pending`:
    awaiting this continues it exactly where a Task would have (results, exceptions and
    cancellation are passed through to it)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self._coro, self._pending
        while True:
            try:
                try:
                    sent = yield pending
                except BaseException as exc:  # handed to the coroutine, as a Task would
                    pending = coro.throw(exc)
                else:
                    pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def deliver(callback: Any, message: Any, wait_first: Any, suspended: asyncio.Event) -> None:
    """`callback(message)`, inline while it does not block, else under `wait_first` with the
    flow's suspension as Faust does."""
    coro = callback(message)
    try:
        pending = coro.send(None)
    except StopIteration:
        return
    await wait_first(Resumed(coro, pending), suspended.wait())


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when the consumer starts, which is after this.
        consumer._fetch_max_wait_ms = fetch_max_wait_ms(transport.app)
        return consumer


class LeanConsumer(faust_aiokafka.Consumer):
    _batched: dict[str, bool]
    _batched_generation: int | None = None
    #: Stream partitions were resumed and the flow not yet after them (module docstring).
    _streams_held = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per partition: last offset of a delivered batch -> the batch's other offsets.
        self._batch_offsets: defaultdict[TP, dict[int, list[int]]] = defaultdict(dict)

    def _new_consumer_thread(self) -> Any:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def resume_partitions(self, tps: Any) -> None:
        tps = set(tps)
        if any(not self._is_changelog_tp(tp) for tp in tps):
            self._streams_held = True
        super().resume_partitions(tps)

    def resume_flow(self) -> None:
        super().resume_flow()
        self._streams_held = False

    def _reset_state(self) -> None:  # a restarted consumer starts with its flow on
        super()._reset_state()
        self._streams_held = False

    def streams_take_events(self) -> bool:
        """Whether an event delivered to a stream now reaches it (module docstring)."""
        return not self._streams_held and self.app.flow_control.is_active()

    def is_batched(self, topic: str) -> bool:
        """Whether `topic`'s subscribers take `RecordBatch`es, as the conductor's
        subscriptions say (they change with a rebalance, so the answers are kept per
        generation)."""
        generation = self.app.consumer_generation_id
        if self._batched_generation != generation:
            self._batched, self._batched_generation = {}, generation
        batched = self._batched.get(topic)
        if batched is None:
            index = cast(Any, self.app.topics)._topic_name_index  # the Conductor
            batched = self._batched[topic] = is_batched(index.get(topic, ()))
        return batched

    def batch_delivered(self, tp: TP, records: list[Any]) -> None:
        """Note which offsets a batch stands for. A stream acknowledges an event's message
        by its one offset (Faust's compiled stream iterator does so inline, without calling
        the consumer), so only the batch's last offset is acknowledged; `_new_offset` adds
        the others when it finds that one acknowledged."""
        if len(records) > 1:
            self._batch_offsets[tp][records[-1].offset] = [r.offset for r in records[:-1]]

    def _new_offset(self, tp: TP) -> int | None:
        pending = self._batch_offsets.get(tp)
        if pending:
            acked = self._acked[tp]
            acked_index = self._acked_index[tp]
            committed = self._committed_offset[tp]
            for last in [offset for offset in acked if offset in pending]:
                for offset in pending.pop(last):
                    if (committed is None or offset >= committed) and offset not in acked_index:
                        acked_index.add(offset)
                        acked.append(offset)
            if committed is not None:  # batches skipped and never acknowledged
                for last in [offset for offset in pending if offset < committed]:
                    del pending[last]
        new_offset: int | None = super()._new_offset(tp)
        return new_offset

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._batch_offsets.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - the worker's
        # loop, covered by every integration test and the benchmarks (Faust's own is too).
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                fetched = await self._fetch()
                await self.sleep(0)
                if fetched is not None and not self.should_stop:
                    per_record, batched, generation = fetched
                    await self._deliver_records(per_record, generation)
                    await self._deliver_batches(batched, generation)
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _fetch(self) -> tuple[dict[TP, list[Any]], dict[TP, list[Any]], int] | None:
        """One fetch, as Faust's `getmany` takes it (flow control, active partitions), split
        into the records of per-record topics and those of batched ones, with the consumer
        generation it was made in; None when there is nothing to deliver."""
        records, active = await self._wait_next_records(1.0)
        generation = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return None
        if not self.flow_active:
            self.log.dev("fetch while flow not active: seek back to committed offsets")
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return None
        per_record: dict[TP, list[Any]] = {}
        batched: dict[TP, list[Any]] = {}
        buffered = self._buffered_partitions
        track_end_offset = self.app.monitor.track_tp_end_offset
        for tp, tp_records in records.items():
            if tp_records and (active is None or tp in active or tp in buffered):
                track_end_offset(tp, self.highwater(tp))
                (batched if self.is_batched(tp.topic) else per_record)[tp] = tp_records
        return per_record, batched, generation

    def _current(self, generation: int) -> bool:
        """The flow is on and no rebalance started since the fetch (Faust's `getmany` stops
        delivering a fetch then: its records are fetched again after the rebalance)."""
        return self.flow_active and self.app.consumer_generation_id == generation

    async def _streams_resumed(self, generation: int) -> bool:
        """Wait until events delivered to streams reach them (see the module docstring);
        False when the fetch went stale or the worker stops meanwhile."""
        started = time.monotonic()
        while not self.streams_take_events():
            if not self._current(generation) or self.should_stop:
                return False
            # Polled: it happens once per recovery, and mode's events are bound to a loop.
            await asyncio.sleep(FLOW_CHECK_SECONDS)
        current = self._current(generation)
        self.log.info(
            "Fetch held %.2f s until streams took events again (%s)",
            time.monotonic() - started,
            "delivered" if current else "dropped: rebalanced meanwhile",
        )
        return current

    async def _before_delivery(self, tp: TP, topic: str, offset: int, read: int | None) -> None:
        """What Faust's loop does before it hands a record on: offsets skipped in the
        partition (transaction markers, compacted records) count as done, and every
        `commit_every` acknowledgements trigger a commit."""
        if read and offset - read > 1 and self.app.topics.acks_enabled_for(topic):
            await self._add_gap(tp, read + 1, offset)
        commit_every = self._commit_every
        if commit_every is not None and self._n_acked >= commit_every:
            self._n_acked = 0
            await self.commit()

    async def _deliver_records(self, records: dict[TP, list[Any]], generation: int) -> None:
        """Faust's delivery, one event per record, round-robin over the partitions."""
        callback, wait_first, suspended = self.callback, self.wait_first, self.suspend_flow
        read_offset = self._read_offset
        to_message = self._to_message
        streams_active = self.streams_take_events
        is_changelog = self._is_changelog_tp
        since_yield = 0
        for tp, record in self.scheduler.iterate(records):
            if not self._current(generation):
                return
            # Changelog records go to the recovery, which reads them while streams are held.
            if (
                not streams_active()
                and not is_changelog(tp)
                and not await self._streams_resumed(generation)
            ):
                return
            since_yield += 1
            if since_yield > 100:
                await asyncio.sleep(0)
                since_yield = 0
            offset = record.offset
            read = read_offset[tp]
            if read is None or offset >= read:
                await self._before_delivery(tp, tp.topic, offset, read)
                if not self._current(generation):
                    return
                # Set before the delivery, which may block: a rebalance meanwhile resets the
                # read offsets (its seek), and setting it after would undo that.
                read_offset[tp] = offset
                await deliver(callback, to_message(tp, record), wait_first, suspended)

    async def _deliver_batches(self, batches: dict[TP, list[Any]], generation: int) -> None:
        """One `RecordBatch` per partition: the fetched records as the Kafka client returned
        them (no Faust message per record), from the partition's read offset on."""
        callback, wait_first, suspended = self.callback, self.wait_first, self.suspend_flow
        read_offset = self._read_offset
        streams_active = self.streams_take_events
        for tp, records in batches.items():
            if not self._current(generation):
                return
            if not streams_active() and not await self._streams_resumed(generation):
                return
            # Read after that wait: the recovery's seek may have moved it.
            read = read_offset[tp]
            if read is not None and records[0].offset < read:
                records = [record for record in records if record.offset >= read]
                if not records:
                    continue
            topic = tp.topic
            first, last = records[0].offset, records[-1].offset
            if (read and first - read > 1) or last - first != len(records) - 1:
                # Offsets the partition skips (the common fetch is contiguous: no walk).
                for record in records:
                    offset = record.offset
                    if read and offset - read > 1:
                        await self._before_delivery(tp, topic, offset, read)
                    read = offset
            await self._before_delivery(tp, topic, last, None)
            # Checked again after the awaits above (a commit, gaps): if a rebalance came in
            # between, its seek decides what is read next, and this fetch is dropped. Setting
            # the read offset after that seek would skip the batch for good -- at the start
            # of a partition, where the agent cannot see the hole (benchmarks/ lost one).
            if not self._current(generation):
                return
            read_offset[tp] = last
            self.batch_delivered(tp, records)
            batch = RecordBatch.of(tp, records, generation)
            await deliver(callback, batch, wait_first, suspended)


class Transport(faust_aiokafka.Transport):
    Consumer = LeanConsumer
    Producer = IdempotentProducer
