"""The one path every source uses to write `stock-quotes`: keyed by symbol, acks=all,
idempotent, batched and compressed, and it loses nothing when the broker goes away.

Normal path: records go straight to an idempotent aiokafka producer. Every record's delivery
is tracked; an acknowledgement is counted (`sent`, `stockstream_producer_sent_total`, the
delivery latency histogram) and logged at DEBUG with topic, partition, offset and symbol.

When the broker does not acknowledge a record within `PRODUCER_DELIVERY_TIMEOUT_SECONDS`, or a
send fails, the producer *session* (one aiokafka producer) is given up: its sender is stopped
and its connections closed, so no stale internal retry can reach the broker afterwards, and
every record it had not had acknowledged is written, in send order, to the local spool
(`stockstream/spool.py`, `PRODUCER_SPOOL_DIR/<topic>/`). From then on new records are appended
behind them, so per-symbol order is kept. A background task tries every
`PRODUCER_SPOOL_RETRY_SECONDS` to open a new session; once it can, it re-sends the spool in
order and only when it has handed out the last spooled record do new records go directly to
the broker again (nothing can overtake the spool). Spool segments are deleted only after their
records are acknowledged. An existing spool is drained first on start; a crash in the middle
of a drain re-sends only unacknowledged records.

No duplicates from the spool. A record that was not acknowledged may still have been written:
the broker appended it but the answer was lost (a broker stopped with SIGTERM appends the
requests it already read and closes the connections without answering). Re-sending it blindly
would duplicate it. So such records are "in doubt" and are reconciled before anything is
re-sent: the producer remembers, per partition, the offset after its last acknowledged record
(or the end offset when the session started) -- an in-doubt record that reached the topic can
only be at or after it, and in send order (one idempotent session keeps per-partition order
and has no gaps). The next session, before sending anything, reads each affected partition
from that offset to its current end and matches the in-doubt records in order by key and
value bytes; the ones found are acknowledged without being sent again
(`stockstream_producer_reconciled_total`), the others are re-sent. The baseline lives in the
spool state (`sent_upto`: the highest spool sequence number that may have been handed to a
session, written *before* handing records out; `floors`: the per-partition offsets), so this
also works across a crash or restart.

What remains at-least-once, precisely:
- a produce request still queued inside a *live* broker when the next session reads the
  partitions (the old session's connections are closed first, but a broker that is alive and
  slower than the delivery timeout may still append a request it read earlier);
- another producer writing byte-identical records (same key and JSON value) to the same
  partition in the reconciled range -- such a record is taken for ours;
- a partition count change between the failed send and the reconciliation, and keyless records
  (neither can be located, so they are re-sent).

What can be lost: records not yet fsync'd to the spool when the *process* dies (the spool is
fsync'd every 50 ms and on flush/close), and records in flight when the process is killed
(SIGKILL) while the broker is up -- the spool protects against broker outages, not against
a crash of the producer itself. `close()` (SIGINT/SIGTERM in the CLI) waits up to the delivery
timeout for what is in flight and spools the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from stockstream.contracts import Quote
from stockstream.producer_metrics import ProducerInstruments
from stockstream.settings import Settings
from stockstream.spool import Spool, SpoolRecord
from stockstream.topics import bootstrap_list

log = logging.getLogger(__name__)

_TICK_SECONDS = 0.05  # delivery deadlines, spool fsync and state, metrics
_DRAIN_CHUNK = 2000  # spool records read (and announced in `sent_upto`) at a time
_YIELD_EVERY = 256  # spooled sends between two turns given to the event loop
_PARTITIONER = DefaultPartitioner()


class DeliveryError(RuntimeError):
    """Records were lost: refused by Kafka (e.g. too large) or impossible to spool."""


class SessionAborted(KafkaError):
    """The producer session was given up after a delivery failure; its records are spooled."""


class _Mode(enum.Enum):
    DIRECT = "direct"  # spool drained: records go straight to the session
    SPOOL = "spool"  # records are appended to the spool (broker away, or spool draining)


class _Outcome(enum.Enum):
    ACCEPTED = 1  # handed to the session, delivery tracked
    REJECTED = 2  # refused for good (too large): dropped, counted as lost
    NOT_SENT = 3  # the session failed before taking it
    IN_DOUBT = 4  # taken by a session that failed meanwhile: it may have gone out


class _Session:
    """One aiokafka producer and what it was handed."""

    def __init__(
        self,
        number: int,
        producer: AIOKafkaProducer,
        partitions: list[int],
        end_offsets: dict[int, int],
        consumer: AIOKafkaConsumer | None,
    ) -> None:
        self.number = number
        self.producer = producer
        self.partitions = partitions
        self.end_offsets = end_offsets
        # Per partition, the offset at or after which an unacknowledged record of this
        # session can be: the end offset at start, then after the last acknowledged record.
        self.floors = dict(end_offsets)
        self.consumer = consumer
        self.pending: deque[_Pending] = deque()  # in send order
        self.dead = False
        self.active_sends = 0  # send() calls inside producer.send right now
        self.unacked = 0  # handed over, not acknowledged yet
        self.baseline = False  # the spool's reconciliation baseline is this session's

    def floors_json(self) -> dict[str, int]:
        return {str(p): o for p, o in self.floors.items()}


class _Pending:
    """A record handed to a session; called back by its delivery future."""

    __slots__ = (
        "done",
        "future",
        "key",
        "owner",
        "sent_at",
        "seq",
        "session",
        "timestamp_ms",
        "value",
    )

    def __init__(
        self,
        owner: QuoteProducer,
        session: _Session,
        key: bytes | None,
        value: bytes,
        timestamp_ms: int | None,
        seq: int | None,
        sent_at: float,
        future: asyncio.Future[Any],
    ) -> None:
        self.owner = owner
        self.session = session
        self.key = key
        self.value = value
        self.timestamp_ms = timestamp_ms
        self.seq = seq  # spool sequence number, None when sent directly
        self.sent_at = sent_at
        self.future = future
        self.done = False

    def __call__(self, future: asyncio.Future[Any]) -> None:
        self.owner._on_delivery(self, future)


def _symbol(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "replace")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _partition_for(key: bytes | None, partitions: list[int]) -> int | None:
    """The partition aiokafka's default partitioner picks for `key` (murmur2, like Java)."""
    if key is None or not partitions:
        return None
    return int(_PARTITIONER(key, partitions, partitions))


def _stop_sending(producer: AIOKafkaProducer) -> None:
    """Stop a session's aiokafka producer from sending anything more, now (synchronously).

    `AIOKafkaProducer.stop()` would wait until every batch is delivered, which with
    idempotence and an unreachable broker is forever. Cancelling the sender task is enough
    to stop new produce requests (only it drains batches, retries included); `_dispose`
    finishes the job."""
    sender: Any = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()


async def _dispose(producer: AIOKafkaProducer, exc: BaseException, wait_seconds: float) -> None:
    """After `_stop_sending`: close the connections (requests in flight fail at once), let
    the cancelled sender task finish, then fail every batch still held, so their futures --
    and any send() waiting for room in a full batch -- return. In that order: failing batches
    while the sender still runs trips aiokafka's own bookkeeping of retried batches."""
    client: Any = producer.client
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), wait_seconds)
    # A produce request being retried waits for a metadata refresh that the closed client
    # will never do; release it so the cancelled sender task can finish.
    refresh = getattr(client, "_md_update_fut", None)
    if refresh is not None and not refresh.done():
        refresh.set_result(False)
    sender: Any = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        await asyncio.wait({task}, timeout=wait_seconds)
    accumulator: Any = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        # A batch put back for a retry sits in `_batches` while its done-callback will
        # remove it from `_pending_batches`: put it there too, or that callback raises
        # KeyError once fail_all resolves it (fail_all is idempotent per batch).
        pending = getattr(accumulator, "_pending_batches", None)
        queued = [b for queue in getattr(accumulator, "_batches", {}).values() for b in queue]
        if isinstance(pending, set):
            pending.update(b for b in queued if getattr(b, "retry_count", 0) > 0)
        accumulator.fail_all(exc)
        # fail_all also fails each batch's drain waiter, which nobody may be waiting on:
        # mark those exceptions retrieved so asyncio does not log them at collection.
        for batch in queued + list(pending or ()):
            waiter = getattr(batch, "_drain_waiter", None)
            if waiter is not None and waiter.done() and not waiter.cancelled():
                waiter.exception()
    # Closed by hand: keeps aiokafka's "Unclosed AIOKafkaProducer" warning quiet.
    producer._closed = True


class QuoteProducer:
    """`async with QuoteProducer(settings) as p: await p.send(quote); await p.flush()`.

    Counters: `sent` (acknowledged), `failed` (delivery attempts that failed; those records
    were spooled), `spooled` (records written to the spool), `reconciled` (spooled records
    found already delivered), `rejected` and `lost` (records that could be neither delivered
    nor spooled; `flush()` raises `DeliveryError` when there are any)."""

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        p = settings.producer
        self._topic = topic or settings.kafka.quotes_topic
        self._bootstrap = bootstrap_list(settings)
        base = spool_dir if spool_dir is not None else p.spool_dir
        self.spool_path = base / self._topic
        self._delivery_timeout = p.delivery_timeout_seconds
        self._retry_seconds = p.spool_retry_seconds
        self._request_timeout = p.request_timeout_ms / 1000
        self._producer_kwargs: dict[str, Any] = {
            "bootstrap_servers": self._bootstrap,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": p.linger_ms,
            "max_batch_size": p.batch_bytes,
            "compression_type": None if p.compression == "none" else p.compression,
            "request_timeout_ms": p.request_timeout_ms,
        }
        self._m = ProducerInstruments(self._topic)
        self._spool: Spool | None = None
        self._mode = _Mode.SPOOL
        self._session: _Session | None = None  # the live session (direct or draining)
        self._sessions = 0
        self._aborts: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._outage_logged = False
        self._queued_since_yield = 0
        self._latencies: list[float] = []  # delivery latencies not yet in the histogram
        self.sent = 0
        self.failed = 0
        self.spooled = 0
        self.reconciled = 0
        self.rejected = 0
        self.spool_errors = 0

    # ------------------------------------------------------------------ public

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def lost(self) -> int:
        return self.rejected + self.spool_errors

    @property
    def spool_pending(self) -> int:
        return 0 if self._spool is None else self._spool.pending

    @property
    def spooling(self) -> bool:
        """True while new records go to the spool instead of the broker."""
        return self._mode is not _Mode.DIRECT

    async def __aenter__(self) -> QuoteProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._started:
            return
        self._spool = Spool(self.spool_path)  # raises SpoolLockedError if in use
        self._started = True
        if self._spool.issues:
            self._m.spool_damaged.inc(len(self._spool.issues))
        if self._spool.pending == 0:
            try:
                # Bounded by the request timeout: a broker that does not answer must not
                # hold up the source; its records go to the spool meanwhile.
                session = await self._open_session(
                    keep_consumer=False, budget=self._request_timeout
                )
            except Exception as exc:
                self._log_outage("broker unavailable at start; spooling until it is back", exc)
            else:
                self._session = session
                self._set_baseline(session)
                self._mode = _Mode.DIRECT
        else:
            log.info(
                "spool not empty at start: draining it before sending directly",
                extra={
                    "topic": self._topic,
                    "spool_pending": self._spool.pending,
                    "spool": str(self.spool_path),
                },
            )
        self._publish()
        self._ticker = asyncio.create_task(self._tick_loop(), name="producer-housekeeping")
        self._drainer = asyncio.create_task(self._drain_loop(), name="producer-spool-drain")

    async def send(self, quote: Quote) -> None:
        """Queue one quote (key = symbol). Waits only when the client's buffer is full."""
        await self.send_raw(quote.symbol.encode(), quote.to_json())

    async def send_raw(
        self, key: bytes | None, value: bytes, timestamp_ms: int | None = None
    ) -> None:
        if self._closed or not self._started:
            raise RuntimeError("QuoteProducer is not running (use `async with`)")
        session = self._session
        if self._mode is _Mode.DIRECT and session is not None:
            outcome = await self._hand_over(session, key, value, timestamp_ms, None)
            if outcome is _Outcome.ACCEPTED or outcome is _Outcome.REJECTED:
                return
            # The session failed. No new session can start before this returns (it waits for
            # send() calls inside the failed one), so the mode is SPOOL now.
            ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
            if outcome is _Outcome.IN_DOUBT:
                self._spool_in_doubt([(key, value, ts)], session, reason="error")
                return
            self._spool_queue(key, value, ts)
            return
        self._spool_queue(key, value, timestamp_ms)
        # Appending to the spool never waits; give the drain and the fsync a turn now and
        # then, or a tight loop of sends would starve them.
        self._queued_since_yield += 1
        if self._queued_since_yield >= _YIELD_EVERY:
            self._queued_since_yield = 0
            await asyncio.sleep(0)

    async def send_all(self, quotes: Iterable[Quote] | AsyncIterator[Quote]) -> int:
        count = 0
        if isinstance(quotes, AsyncIterator):
            async for quote in quotes:
                await self.send(quote)
                count += 1
        else:
            for quote in quotes:
                await self.send(quote)
                count += 1
        await self.flush()
        return count

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged by the broker or durably in
        the spool (a delivery that times out meanwhile moves its records to the spool).
        Raises `DeliveryError` if records were lost."""
        if self._mode is _Mode.DIRECT and self._session is not None:
            await self._wait_in_flight(self._session)
        if self._spool is not None:
            self._persist_spool()
        if self.lost:
            raise DeliveryError(
                f"{self.lost} record(s) could not be delivered to {self._topic} nor spooled"
                f" ({self.rejected} rejected by Kafka, {self.spool_errors} spool write errors)"
            )

    async def wait_drained(self, seconds: float) -> bool:
        """Wait until the spool is empty and records go directly again; False after
        `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._mode is _Mode.DIRECT and self.spool_pending == 0:
                return True
            await asyncio.sleep(_TICK_SECONDS)
        return self._mode is _Mode.DIRECT and self.spool_pending == 0

    async def close(self) -> None:
        """Flush what is in flight (waiting up to the delivery timeout), spool the rest,
        make the spool durable and stop."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        session = self._session
        if session is not None and not session.dead:
            if session.consumer is not None:
                await self._stop_consumer(session)
            await self._wait_in_flight(session)
            if not session.dead:
                try:
                    await asyncio.wait_for(session.producer.stop(), self._delivery_timeout)
                except Exception as exc:
                    self._fail_session(session, "shutdown", exc)
                else:
                    session.dead = True
                    self._session = None
        await self._await_aborts()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        assert self._spool is not None
        try:
            self._persist_spool()
        finally:
            pending = self._spool.pending
            self._spool.close()
            self._publish()
        log.info(
            "producer closed",
            extra={
                "topic": self._topic,
                "sent": self.sent,
                "failed": self.failed,
                "spooled": self.spooled,
                "reconciled": self.reconciled,
                "spool_pending": pending,
                "lost": self.lost,
            },
        )

    # ------------------------------------------------------------------ sessions

    async def _open_session(self, keep_consumer: bool, budget: float | None = None) -> _Session:
        """Start a producer, learn the partitions and their end offsets (the floors), within
        `budget` seconds (default: the larger of the delivery and request timeouts)."""
        producer = AIOKafkaProducer(
            **self._producer_kwargs, client_id=f"stockstream-{self._topic}-{self._sessions + 1}"
        )
        consumer: AIOKafkaConsumer | None = None
        if budget is None:
            budget = max(self._delivery_timeout, self._request_timeout)
        try:
            async with asyncio.timeout(budget):
                await producer.start()
                partitions = sorted(await producer.partitions_for(self._topic))
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self._bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    client_id=f"stockstream-{self._topic}-reconcile",
                )
                await consumer.start()
                ends = await consumer.end_offsets(
                    [TopicPartition(self._topic, p) for p in partitions]
                )
        except BaseException as exc:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            _stop_sending(producer)
            await _dispose(producer, SessionAborted(repr(exc)), self._request_timeout)
            raise
        if not keep_consumer:
            await consumer.stop()
            consumer = None
        self._sessions += 1
        session = _Session(
            self._sessions,
            producer,
            partitions,
            {tp.partition: o for tp, o in ends.items()},
            consumer,
        )
        if self._outage_logged:
            log.info("broker reachable again", extra={"topic": self._topic})
            self._outage_logged = False
        return session

    async def _stop_consumer(self, session: _Session) -> None:
        consumer, session.consumer = session.consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), self._request_timeout + 1)

    def _set_baseline(self, session: _Session) -> None:
        """Make `session` the spool's reconciliation baseline: nothing in the spool has been
        handed to it yet. Durable before it gets any spooled record."""
        spool = self._spool
        assert spool is not None
        spool.save(
            {
                "sent_upto": spool.acked_through,
                "floors": session.floors_json(),
                "partitions": len(session.partitions),
            }
        )
        session.baseline = True

    async def _hand_over(
        self,
        session: _Session,
        key: bytes | None,
        value: bytes,
        timestamp_ms: int | None,
        seq: int | None,
    ) -> _Outcome:
        sent_at = time.monotonic()
        session.active_sends += 1
        try:
            future = await session.producer.send(
                self._topic, value=value, key=key, timestamp_ms=timestamp_ms
            )
        except MessageSizeTooLargeError as exc:
            self._reject(key, seq, exc)
            return _Outcome.REJECTED
        except Exception as exc:
            # Raised before the record was added to a batch: it has not gone out.
            self._fail_session(session, "error", exc)
            return _Outcome.NOT_SENT
        finally:
            session.active_sends -= 1
        if session.dead:
            future.add_done_callback(_retrieve)
            return _Outcome.IN_DOUBT
        entry = _Pending(self, session, key, value, timestamp_ms, seq, sent_at, future)
        session.pending.append(entry)
        session.unacked += 1
        future.add_done_callback(entry)
        return _Outcome.ACCEPTED

    def _on_delivery(self, entry: _Pending, future: asyncio.Future[Any]) -> None:
        # Read the exception first, also when it is ignored, or asyncio reports it as
        # "never retrieved" when the future is collected.
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        session = entry.session
        if session.dead:
            return  # its records are in the spool already; the reconciliation decides
        if exc is not None:
            self._fail_session(session, "error", exc)
            return
        entry.done = True
        session.unacked -= 1
        meta = future.result()
        self.sent += 1
        latency = time.monotonic() - entry.sent_at
        self._latencies.append(latency)
        offset = meta.offset
        if offset >= 0 and offset >= session.floors.get(meta.partition, 0):
            session.floors[meta.partition] = offset + 1
        if entry.seq is not None:
            assert self._spool is not None
            self._spool.ack(entry.seq)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "delivered",
                extra={
                    "topic": meta.topic,
                    "partition": meta.partition,
                    "offset": offset,
                    "symbol": _symbol(entry.key),
                    "latency_ms": round(latency * 1000, 3),
                    "from_spool": entry.seq is not None,
                },
            )

    def _fail_session(self, session: _Session, reason: str, exc: BaseException) -> None:
        """Give the session up, now (synchronously, so nothing can slip in between): stop its
        sender, move its unacknowledged records to the spool in send order, switch to SPOOL."""
        if session.dead:
            return
        session.dead = True
        if self._session is session:
            self._session = None
        self._mode = _Mode.SPOOL
        _stop_sending(session.producer)
        unacked = [e for e in session.pending if not e.done]
        session.pending.clear()
        error = repr(exc)
        for e in unacked:
            log.warning(
                "delivery failed; record spooled",
                extra={
                    "topic": self._topic,
                    "partition": _partition_for(e.key, session.partitions),
                    "offset": None,
                    "symbol": _symbol(e.key),
                    "reason": reason,
                    "error": error,
                    "spool_seq": e.seq,
                },
            )
        if unacked:
            self.failed += len(unacked)
            self._m.failed[reason if reason in self._m.failed else "error"].inc(len(unacked))
        assert self._spool is not None
        self._spool.rewind()
        now_wall, now_mono = time.time(), time.monotonic()
        direct = [
            (
                e.key,
                e.value,
                e.timestamp_ms
                if e.timestamp_ms is not None
                else int((now_wall - (now_mono - e.sent_at)) * 1000),
            )
            for e in unacked
            if e.seq is None
        ]
        self._spool_in_doubt(direct, session, reason=None)
        log.warning(
            "producer session given up; records go to the spool until the broker is back",
            extra={
                "topic": self._topic,
                "reason": reason,
                "error": error,
                "unacknowledged": len(unacked),
                "spool_pending": self._spool.pending,
                "retry_seconds": self._retry_seconds,
            },
        )
        self._publish()
        aborted = SessionAborted(f"{reason}: {exc!r}")
        task = asyncio.get_running_loop().create_task(self._abort(session, aborted))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        self._wakeup.set()

    async def _abort(self, session: _Session, exc: SessionAborted) -> None:
        await _dispose(session.producer, exc, self._request_timeout)
        # send() calls that were inside the session have returned now (its batches are
        # failed); wait until they have spooled their records before a new session starts.
        deadline = time.monotonic() + self._request_timeout + 1
        # Polled: an Event set/cleared around every send would cost the hot path.
        while session.active_sends and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await self._stop_consumer(session)

    async def _await_aborts(self) -> None:
        if self._aborts:
            await asyncio.wait(set(self._aborts))

    async def _wait_in_flight(self, session: _Session) -> None:
        """Until the session has nothing unacknowledged or has failed (the housekeeping
        fails it when the oldest record passes the delivery timeout, which also ends the
        client's flush: its batches are failed)."""
        while not session.dead and session.unacked:
            await session.producer.flush()
            await asyncio.sleep(0)  # let the per-record delivery callbacks run

    # ------------------------------------------------------------------ spool

    def _spool_queue(self, key: bytes | None, value: bytes, timestamp_ms: int | None) -> None:
        """Append a record that was never sent (it waits behind the spool)."""
        assert self._spool is not None
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        try:
            seq = self._spool.append(key, value, ts)
        except OSError as exc:
            self._spool_error([key], exc)
            return
        self.spooled += 1
        self._m.spooled["queued"].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "spooled",
                extra={"topic": self._topic, "symbol": _symbol(key), "spool_seq": seq},
            )

    def _spool_in_doubt(
        self,
        records: list[tuple[bytes | None, bytes, int]],
        session: _Session,
        reason: str | None,
    ) -> None:
        """Append records that a (now dead) session may have sent, behind what is spooled.
        The baseline that lets the next session find them in the topic is made durable
        first; a crash in between only over-approximates what is in doubt."""
        spool = self._spool
        assert spool is not None
        if reason is not None:  # a single record that failed after the session snapshot
            self.failed += len(records)
            self._m.failed[reason].inc(len(records))
        try:
            meta = dict(spool.meta)
            if session.baseline:
                meta["floors"] = session.floors_json()
                meta["partitions"] = len(session.partitions)
            if records:
                meta["sent_upto"] = max(
                    int(meta.get("sent_upto", 0)), spool.next_seq + len(records) - 1
                )
            spool.save(meta)
            for key, value, ts in records:
                spool.append(key, value, ts)
            spool.flush(fsync=True)
        except OSError as exc:
            self._spool_error([r[0] for r in records], exc)
            return
        self.spooled += len(records)
        if records:
            self._m.spooled["failed"].inc(len(records))

    def _spool_error(self, keys: list[bytes | None], exc: OSError) -> None:
        self.spool_errors += len(keys)
        self._m.failed["spool_error"].inc(len(keys))
        for key in keys:
            log.error(
                "record lost: could not write it to the spool",
                extra={
                    "topic": self._topic,
                    "symbol": _symbol(key),
                    "error": repr(exc),
                    "spool": str(self.spool_path),
                },
            )

    def _reject(self, key: bytes | None, seq: int | None, exc: BaseException) -> None:
        self.rejected += 1
        self._m.failed["rejected"].inc()
        log.error(
            "record rejected by Kafka and dropped",
            extra={
                "topic": self._topic,
                "symbol": _symbol(key),
                "error": repr(exc),
                "spool_seq": seq,
            },
        )
        if seq is not None and self._spool is not None:
            self._spool.ack(seq)  # it can never be delivered; do not block the spool on it

    def _persist_spool(self) -> None:
        """fsync appended records and write the acknowledgement state (with the current
        floors when the live session is the baseline)."""
        spool = self._spool
        assert spool is not None
        try:
            spool.flush(fsync=True)
            if spool.state_dirty or spool.pending == 0:
                session = self._session
                meta = None
                if session is not None and not session.dead and session.baseline:
                    meta = {
                        **spool.meta,
                        "floors": session.floors_json(),
                        "partitions": len(session.partitions),
                    }
                spool.save(meta)
        except OSError as exc:
            log.error(
                "spool write failed",
                extra={"topic": self._topic, "spool": str(self.spool_path), "error": repr(exc)},
            )

    # ------------------------------------------------------------------ drain

    async def _drain_loop(self) -> None:
        while True:
            if self._mode is _Mode.DIRECT:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._drain_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log_outage("spool not drained: broker unavailable, will retry", exc)
                await asyncio.sleep(self._retry_seconds)

    def _log_outage(self, message: str, exc: BaseException) -> None:
        extra = {
            "topic": self._topic,
            "error": repr(exc),
            "retry_seconds": self._retry_seconds,
            "spool_pending": self.spool_pending,
        }
        if self._outage_logged:
            log.debug(message, extra=extra)
        else:
            log.warning(message, extra=extra)
            self._outage_logged = True

    async def _drain_once(self) -> None:
        await self._await_aborts()
        spool = self._spool
        assert spool is not None
        session = await self._open_session(keep_consumer=True)
        self._session = session  # the housekeeping enforces its delivery deadline from now
        try:
            try:
                await self._reconcile(session)
            finally:
                await self._stop_consumer(session)
            spool.rewind()
            self._set_baseline(session)
            while True:
                if session.dead:
                    raise SessionAborted("session failed while draining the spool")
                chunk = spool.read(_DRAIN_CHUNK)
                if not chunk:
                    # Caught up with the writer; no await between the read and the switch,
                    # so no record can be appended to the spool in between.
                    self._mode = _Mode.DIRECT
                    self._publish()
                    log.info(
                        "spool drained; sending directly again",
                        extra={"topic": self._topic, "spool_pending": spool.pending},
                    )
                    return
                # Write-ahead: the baseline covers these before any of them goes out.
                spool.save(
                    {**spool.meta, "sent_upto": chunk[-1].seq, "floors": session.floors_json()}
                )
                for record in chunk:
                    outcome = await self._hand_over(
                        session, record.key, record.value, record.timestamp_ms, record.seq
                    )
                    if outcome is _Outcome.NOT_SENT or outcome is _Outcome.IN_DOUBT:
                        raise SessionAborted("session failed while draining the spool")
        except asyncio.CancelledError:
            raise  # close(): it flushes the live session itself
        except BaseException as exc:
            self._fail_session(session, "error", exc)
            raise

    async def _reconcile(self, session: _Session) -> None:
        """Find in the topic the spooled records an earlier session may have delivered
        without an acknowledgement, and acknowledge them instead of sending them again."""
        spool = self._spool
        assert spool is not None and session.consumer is not None
        floors = spool.meta.get("floors")
        upto = int(spool.meta.get("sent_upto", 0))
        if not isinstance(floors, dict) or upto <= spool.acked_through:
            return
        doubt = spool.scan(upto)
        if not doubt:
            return
        by_partition: dict[int, list[SpoolRecord]] = {}
        for record in doubt:
            p = _partition_for(record.key, session.partitions)
            if p is not None:
                by_partition.setdefault(p, []).append(record)
        consumer = session.consumer
        tps = {p: TopicPartition(self._topic, p) for p in by_partition}
        consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            start = floors.get(str(p))
            if start is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, int(start))
        matched = dict.fromkeys(by_partition, 0)
        found: list[tuple[SpoolRecord, int, int]] = []
        open_tps = set(tps)
        deadline = time.monotonic() + max(30.0, 3 * self._delivery_timeout)
        while open_tps:
            for p in list(open_tps):
                end = session.end_offsets.get(p, 0)
                if matched[p] >= len(by_partition[p]) or await consumer.position(tps[p]) >= end:
                    open_tps.discard(p)
            if not open_tps:
                break
            if time.monotonic() > deadline:
                raise KafkaTimeoutError("reconciliation did not finish reading the partitions")
            batches = await consumer.getmany(*(tps[p] for p in open_tps), timeout_ms=200)
            for tp, messages in batches.items():
                p = tp.partition
                wanted = by_partition[p]
                end = session.end_offsets.get(p, 0)
                for message in messages:
                    if message.offset >= end or matched[p] >= len(wanted):
                        break
                    record = wanted[matched[p]]
                    if message.key == record.key and message.value == record.value:
                        found.append((record, p, message.offset))
                        matched[p] += 1
        for record, p, offset in found:
            spool.ack(record.seq)
            self.sent += 1
            self.reconciled += 1
            log.debug(
                "already delivered, not sent again",
                extra={
                    "topic": self._topic,
                    "partition": p,
                    "offset": offset,
                    "symbol": _symbol(record.key),
                    "spool_seq": record.seq,
                },
            )
        if found:
            self._m.reconciled.inc(len(found))
        spool.save()
        log.info(
            "reconciled unacknowledged records with the topic",
            extra={
                "topic": self._topic,
                "in_doubt": len(doubt),
                "already_delivered": len(found),
                "to_resend": len(doubt) - len(found),
            },
        )

    # ------------------------------------------------------------------ housekeeping

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            try:
                self._housekeeping()
            except Exception:
                log.exception("producer housekeeping failed", extra={"topic": self._topic})

    def _housekeeping(self) -> None:
        session = self._session
        if session is not None and not session.dead:
            pending = session.pending
            while pending and pending[0].done:
                pending.popleft()
            if pending and time.monotonic() - pending[0].sent_at > self._delivery_timeout:
                self._fail_session(
                    session,
                    "timeout",
                    KafkaTimeoutError(f"not acknowledged within {self._delivery_timeout:g}s"),
                )
        spool = self._spool
        if spool is not None and (spool.unsynced or spool.state_dirty):
            self._persist_spool()
        self._publish()

    def _publish(self) -> None:
        if self._latencies:
            latencies, self._latencies = self._latencies, []
            self._m.observe_deliveries(latencies)
        self._m.publish_sent(self.sent)
        self._m.spool_pending.set(self.spool_pending)
        self._m.spooling.set(0 if self._mode is _Mode.DIRECT else 1)
