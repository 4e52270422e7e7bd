"""The live chart's data feed: one tail of the aggregated and anomalies topics per worker process,
fanned out to the chart's event streams, and the forming candles polled every second.

- The tail is a consumer without a group (every partition of both topics; the chart shows any
  symbol, whichever worker owns it). It starts on the first chart request, not with the worker,
  and begins `BACKFILL_RECORDS` records before each partition's end: that fills the book of
  recent candles (web/candles.py) the chart's history comes from. Nothing is fanned out during
  that backfill; once caught up, every open stream gets a fresh snapshot instead. The anomalies
  topic may not exist yet: it is looked for again every `TOPIC_CHECK_SECONDS`.
- A record the chart cannot read is skipped, logged and counted, not dead-lettered: the chart
  only reads topics other stages own (and every worker re-reads them at every start), so a
  dead letter from here would repeat theirs.
- Each stream has a bounded queue. A client that does not keep up is dropped, never waited
  for: its queue is cut and the stream ends (the browser's EventSource reconnects and starts
  over from a snapshot).
- Forming candles (web/forming.py): polled every second for the symbols that have streams,
  from this worker's window state or from the worker that owns the symbol's partition; sent
  only when they changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiokafka import TopicPartition
from mode import Service

from stockstream.contracts.anomalies import AnomalyRecordError, parse_anomaly
from stockstream.contracts.windows import WindowRecordError, parse_window
from stockstream.kafka import clients
from stockstream.kafka.topics import partitions_of
from stockstream.metrics import CHART_CLIENTS, CHART_CLIENTS_DROPPED, CHART_RECORDS_SKIPPED
from stockstream.retry import Backoff
from stockstream.settings import Settings
from stockstream.tables.window_state import WindowState
from stockstream.web.candles import HISTORY_CANDLES, CandleBook, check_symbol
from stockstream.web.forming import FormingCandles, OwnerOf, default_partition

log = logging.getLogger(__name__)

#: Records read back per partition at start: ~100 symbols' worth of history each.
BACKFILL_RECORDS = 100 * HISTORY_CANDLES
#: Larger values are not windows or anomalies the project writes: skipped unread.
MAX_RECORD_BYTES = 64 * 1024
#: Open event streams per worker process.
MAX_CLIENTS = 64
#: Frames waiting per stream before its client counts as not keeping up.
QUEUE_FRAMES = 256
TOPIC_CHECK_SECONDS = 15.0
FORMING_POLL_SECONDS = 1.0
TAIL_BACKOFF = Backoff(1.0, 30.0)


def sse_frame(event: str, payload: Any) -> bytes:
    """One server-sent event (orjson never writes a newline, so `data` is one line)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class TooManyClients(Exception):
    """`MAX_CLIENTS` streams are open already."""


class Subscriber:
    """One event stream: frames for one symbol, in a bounded queue; None ends the stream."""

    def __init__(self, symbol: str, size: int = QUEUE_FRAMES) -> None:
        self.symbol = symbol
        self.dropped = False
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(size)

    def offer(self, frame: bytes | None) -> bool:
        """Queue `frame` without waiting; False when the client had fallen behind (it is
        then dropped: the queue is emptied and the stream ends after what it was writing)."""
        if self.dropped:
            return False
        try:
            self._queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            self.close()
            return False

    def close(self) -> None:
        self.dropped = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def next(self) -> bytes | None:
        return await self._queue.get()


class ChartFeed(Service):
    """The shared tail, the book it fills, the forming-candle poll and the open streams."""

    def __init__(
        self, settings: Settings, state: WindowState, owner: OwnerOf, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._settings = settings
        self._state = state
        self.book = CandleBook()
        self.forming = FormingCandles(settings, state, owner, self.book.partition_of)
        self.ready = asyncio.Event()
        self._live = False
        self._streams: dict[str, set[Subscriber]] = {}
        self._last_forming: dict[str, bytes] = {}
        self._chart_tasks: list[asyncio.Task[None]] = []

    @property
    def clients(self) -> int:
        return sum(len(s) for s in self._streams.values())

    # ------------------------------------------------------------------ streams

    def ensure_running(self) -> None:
        """Start the tail and the poll (once; the first chart request does)."""
        if not self._chart_tasks:
            self._chart_tasks = [
                asyncio.ensure_future(self._tail_forever()),
                asyncio.ensure_future(self._poll_forming()),
            ]

    def subscribe(self, symbol: str) -> Subscriber:
        """A stream for `symbol`: a snapshot first (and the last forming candles), then live
        frames. Raises `TooManyClients`."""
        if self.clients >= MAX_CLIENTS:
            raise TooManyClients(f"{MAX_CLIENTS} chart streams are open already")
        self.ensure_running()
        subscriber = Subscriber(symbol)
        subscriber.offer(sse_frame("snapshot", self.snapshot(symbol)))
        forming = self._last_forming.get(symbol)
        if forming is not None:
            subscriber.offer(forming)
        self._streams.setdefault(symbol, set()).add(subscriber)
        CHART_CLIENTS.set(self.clients)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        streams = self._streams.get(subscriber.symbol)
        if streams is not None:
            streams.discard(subscriber)
            if not streams:
                del self._streams[subscriber.symbol]
                self._last_forming.pop(subscriber.symbol, None)
        CHART_CLIENTS.set(self.clients)

    def drop(self, subscriber: Subscriber, reason: str) -> None:
        """End a stream whose client does not keep up."""
        subscriber.close()
        CHART_CLIENTS_DROPPED.inc()
        log.info("chart client dropped", extra={"symbol": subscriber.symbol, "reason": reason})

    def close_streams(self) -> None:
        """End every stream (the web server waits for its handlers when it stops)."""
        for streams in list(self._streams.values()):
            for subscriber in list(streams):
                subscriber.close()

    def publish(self, symbol: str, frame: bytes) -> None:
        for subscriber in list(self._streams.get(symbol, ())):
            if not subscriber.dropped and not subscriber.offer(frame):
                CHART_CLIENTS_DROPPED.inc()
                log.info("chart client dropped", extra={"symbol": symbol, "reason": "queue full"})

    def snapshot(self, symbol: str) -> dict[str, Any]:
        body = self.book.snapshot(symbol)
        if body["partition"] is None:
            body["partition"] = default_partition(symbol, self._settings.kafka.partitions)
        body["loading"] = not self.ready.is_set()
        return body

    def symbols(self) -> list[str]:
        """Symbols with closed candles in the book or open windows on this worker."""
        known = set(self.book.symbols())
        for windows in self._state.loaded().values():
            known.update(w.symbol for w in windows.open.values())
        return sorted(known)

    # ------------------------------------------------------------------ records

    def ingest(self, topic: str, partition: int, offset: int, value: bytes | None) -> None:
        """Put one record of the aggregated or anomalies topic into the book, and on the
        streams of its symbol once the backfill is over."""
        kafka = self._settings.kafka
        try:
            if value is None or len(value) > MAX_RECORD_BYTES:
                raise ValueError(f"no value, or larger than {MAX_RECORD_BYTES} bytes")
            data = orjson.loads(value)
            if topic == kafka.aggregated_topic:
                row = parse_window(data)
                event = {"symbol": row["symbol"], "candle": self.book.add_window(row, partition)}
                name = "candle"
            else:
                row = parse_anomaly(data)
                mark = self.book.add_anomaly(row)
                if mark is None:
                    return
                event, name = {"symbol": row["symbol"], "marker": mark}, "anomaly"
        except (ValueError, WindowRecordError, AnomalyRecordError) as exc:
            # orjson.JSONDecodeError is a ValueError.
            CHART_RECORDS_SKIPPED.labels(topic).inc()
            log.warning(
                "chart skipped an unreadable record",
                extra={"topic": topic, "partition": partition, "offset": offset, "error": str(exc)},
            )
            return
        if self._live:
            self.publish(row["symbol"], sse_frame(name, event))

    def _caught_up(self) -> None:
        self._live = True
        self.ready.set()
        for symbol in list(self._streams):
            self.publish(symbol, sse_frame("snapshot", self.snapshot(symbol)))
        log.info("chart history loaded", extra={"symbols": len(self.book)})

    async def _tail_forever(self) -> None:
        failures = 0
        while True:
            try:
                await self._tail()
            except asyncio.CancelledError:
                raise
            except clients.KafkaAccessError as exc:
                # The worker itself stops on a refused login; the chart just stops reading.
                log.error("chart tail cannot access Kafka", extra={"error": str(exc)})
                return
            except Exception as exc:
                pause = TAIL_BACKOFF.delay(failures)
                failures += 1
                log.warning(
                    "chart tail failed, restarting",
                    extra={"error": repr(exc), "retry_in_seconds": round(pause, 1)},
                )
                await asyncio.sleep(pause)

    async def _tail(self) -> None:
        kafka = self._settings.kafka
        self._live = False
        consumer = clients.consumer(
            kafka, group_id=None, enable_auto_commit=False, isolation_level="read_committed"
        )
        await clients.start(consumer, kafka)
        try:
            wanted = [kafka.aggregated_topic, kafka.anomalies_topic]
            assigned: dict[str, int] = {}
            ends: dict[TopicPartition, int] = {}
            next_check = 0.0
            while True:
                if len(assigned) < len(set(wanted)) and time.monotonic() >= next_check:
                    await self._assign(consumer, wanted, assigned, ends)
                    next_check = time.monotonic() + TOPIC_CHECK_SECONDS
                if not assigned:
                    await asyncio.sleep(1.0)
                    continue
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for tp, records in batches.items():
                    for record in records:
                        self.ingest(tp.topic, tp.partition, record.offset, record.value)
                if not self._live and ends:
                    positions = [await consumer.position(tp) for tp in ends]
                    if all(p >= end for p, end in zip(positions, ends.values(), strict=True)):
                        self._caught_up()
        finally:
            await consumer.stop()

    async def _assign(
        self,
        consumer: Any,
        wanted: list[str],
        assigned: dict[str, int],
        ends: dict[TopicPartition, int],
    ) -> None:
        """Add the wanted topics that exist now, each from `BACKFILL_RECORDS` before its end."""
        kafka = self._settings.kafka
        new = {}
        for topic in dict.fromkeys(wanted):
            if topic not in assigned:
                count = len(await partitions_of(kafka, topic))
                if count:
                    new[topic] = count
        if not new:
            return
        # `assign` replaces the assignment and forgets positions: keep those already read.
        kept = {tp: await consumer.position(tp) for tp in consumer.assignment()}
        assigned.update(new)
        consumer.assign([TopicPartition(t, p) for t, n in assigned.items() for p in range(n)])
        for tp, position in kept.items():
            consumer.seek(tp, position)
        fresh = [TopicPartition(t, p) for t, n in new.items() for p in range(n)]
        begins = await consumer.beginning_offsets(fresh)
        end_offsets = await consumer.end_offsets(fresh)
        for tp in fresh:
            consumer.seek(tp, max(begins[tp], end_offsets[tp] - BACKFILL_RECORDS))
            if not self._live:
                ends[tp] = end_offsets[tp]
        log.info("chart tail reading", extra={"topics": sorted(new), "backfill": BACKFILL_RECORDS})

    # ------------------------------------------------------------------ forming candles

    async def _poll_forming(self) -> None:
        while True:
            await asyncio.sleep(FORMING_POLL_SECONDS)
            symbols = [s for s in self._streams if check_symbol(s)]
            if not symbols:
                continue
            bodies = await asyncio.gather(*(self.forming.fetch(s) for s in symbols))
            for symbol, body in zip(symbols, bodies, strict=True):
                frame = sse_frame("forming", body)
                if symbol in self._streams and self._last_forming.get(symbol) != frame:
                    self._last_forming[symbol] = frame
                    self.publish(symbol, frame)

    async def on_stop(self) -> None:
        self.close_streams()
        for task in self._chart_tasks:
            task.cancel()
        for task in self._chart_tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("chart task failed while stopping")
        self._chart_tasks = []
        await self.forming.close()
