"""The one path every source uses to write `stock-quotes`: keyed by symbol, acks=all,
idempotent, batched and compressed, and it loses nothing when the broker goes away.

Longer than ~400 lines on purpose: what is left here is one state machine -- the mode
(DIRECT/SPOOL), the live session, and the transitions between them (hand-over, delivery,
failure, drain, deadline, close). Its correctness rests on which of those steps run without
an await in between (a failure moves records to the spool and switches the mode in one step;
the drain switches back right after its last read); spread over modules, those rules could not
be checked in one place. Its leaf operations live beside it: session.py, reconcile.py,
spooling.py.

Normal path: records go straight to an idempotent aiokafka producer. Every record's delivery
is tracked; an acknowledgement is counted (`sent`, `stockstream_producer_sent_total`, the
delivery latency histogram) and logged at DEBUG with topic, partition, offset and symbol.

When the broker does not acknowledge a record within `PRODUCER_DELIVERY_TIMEOUT_SECONDS`, or a
send fails, the producer *session* (one aiokafka producer, session.py) is given up: its sender
is stopped and its connections closed, so no stale internal retry can reach the broker
afterwards, and every record it had not had acknowledged is written, in send order, to the
local spool (spool.py, `PRODUCER_SPOOL_DIR/<topic>/`, written through spooling.py). From then
on new records are appended behind them, so per-symbol order is kept. A background task tries
every `PRODUCER_SPOOL_RETRY_SECONDS` to open a new session; once it can, it re-sends the spool
in order and only when it has handed out the last spooled record do new records go directly to
the broker again (nothing can overtake the spool). Spool segments are deleted only after their
records are acknowledged. An existing spool is drained first on start; a crash in the middle
of a drain re-sends only unacknowledged records.

No duplicates from the spool: records that a failed session may have delivered are found in
the topic before anything is re-sent, and acknowledged instead (reconcile.py, which also lists
what remains at-least-once).

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
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from stockstream.contracts.quotes import Quote
from stockstream.errors import StockstreamError
from stockstream.kafka.clients import KafkaAccessError
from stockstream.producer.instruments import ProducerInstruments
from stockstream.producer.reconcile import find_delivered
from stockstream.producer.session import (
    Pending,
    Session,
    SessionAborted,
    abort,
    open_session,
    partition_for,
    stop_consumer,
    stop_sending,
    symbol,
)
from stockstream.producer.spool import Spool
from stockstream.producer.spooling import SpoolKeeper
from stockstream.settings import Settings

log = logging.getLogger(__name__)

_TICK_SECONDS = 0.05  # delivery deadlines, spool fsync and state, metrics
_DRAIN_CHUNK = 2000  # spool records read (and announced in `sent_upto`) at a time
_YIELD_EVERY = 256  # spooled sends between two turns given to the event loop


class DeliveryError(StockstreamError):
    """Records were lost: refused by Kafka (e.g. too large) or impossible to spool."""


class _Mode(enum.Enum):
    DIRECT = "direct"  # spool drained: records go straight to the session
    SPOOL = "spool"  # records are appended to the spool (broker away, or spool draining)


class _Outcome(enum.Enum):
    ACCEPTED = 1  # handed to the session, delivery tracked
    REJECTED = 2  # refused for good (too large): dropped, counted as lost
    NOT_SENT = 3  # the session failed before taking it
    IN_DOUBT = 4  # taken by a session that failed meanwhile: it may have gone out


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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
        self._kafka = settings.kafka
        base = spool_dir if spool_dir is not None else p.spool_dir
        self.spool_path = base / self._topic
        self._delivery_timeout = p.delivery_timeout_seconds
        self._retry_seconds = p.spool_retry_seconds
        self._request_timeout = p.request_timeout_ms / 1000
        self._producer_options: dict[str, Any] = {
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": p.linger_ms,
            "max_batch_size": p.batch_bytes,
            "compression_type": None if p.compression == "none" else p.compression,
            "request_timeout_ms": p.request_timeout_ms,
        }
        self._m = ProducerInstruments(self._topic)
        self._keeper = SpoolKeeper(self.spool_path, self._topic, self._m)
        self._spool: Spool | None = None  # the keeper's, once started
        self._mode = _Mode.SPOOL
        self._session: Session | None = None  # the live session (direct or draining)
        self._sessions = 0
        self._aborts: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._outage_logged = False
        # Kafka refused our credentials or TLS: not an outage, so the spool is not drained
        # again and the next send or flush raises it (records already spooled stay there).
        self._refused: KafkaAccessError | None = None
        self._queued_since_yield = 0
        self._latencies: list[float] = []  # delivery latencies not yet in the histogram
        # Bound once: every record's delivery callback calls it.
        self._deliver = self._on_delivery
        self.sent = 0
        self.failed = 0
        self.reconciled = 0

    # ------------------------------------------------------------------ public

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def spooled(self) -> int:
        return self._keeper.spooled

    @property
    def rejected(self) -> int:
        return self._keeper.rejected

    @property
    def spool_errors(self) -> int:
        return self._keeper.spool_errors

    @property
    def lost(self) -> int:
        return self.rejected + self.spool_errors

    @property
    def spool_pending(self) -> int:
        return self._keeper.pending

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
        self._spool = self._keeper.open()  # raises SpoolLockedError if in use
        self._started = True
        if self._spool.pending == 0:
            try:
                # Bounded by the request timeout: a broker that does not answer must not
                # hold up the source; its records go to the spool meanwhile.
                session = await self._open_session(
                    keep_consumer=False, budget=self._request_timeout
                )
            except KafkaAccessError as exc:
                self._refuse(exc)
            except Exception as exc:
                self._log_outage("broker unavailable at start; spooling until it is back", exc)
            else:
                self._session = session
                self._keeper.set_baseline(session)
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
        if self._refused is not None:
            raise self._refused
        session = self._session
        if self._mode is _Mode.DIRECT and session is not None:
            outcome = await self._hand_over(session, key, value, timestamp_ms, None)
            if outcome is _Outcome.ACCEPTED or outcome is _Outcome.REJECTED:
                return
            # The session failed. No new session can start before this returns (it waits for
            # send() calls inside the failed one), so the mode is SPOOL now.
            ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
            if outcome is _Outcome.IN_DOUBT:
                self._count_failed(1, "error")  # it failed after the session's snapshot
                self._keeper.in_doubt([(key, value, ts)], session)
                return
            self._keeper.queue(key, value, ts)
            return
        self._keeper.queue(key, value, timestamp_ms)
        # Appending to the spool never waits; give the drain and the fsync a turn now and
        # then, or a tight loop of sends would starve them.
        self._queued_since_yield += 1
        if self._queued_since_yield >= _YIELD_EVERY:
            self._queued_since_yield = 0
            await asyncio.sleep(0)

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged by the broker or durably in
        the spool (a delivery that times out meanwhile moves its records to the spool).
        Raises `DeliveryError` if records were lost, `KafkaAccessError` if Kafka refused us."""
        if self._refused is not None:
            raise self._refused
        if self._mode is _Mode.DIRECT and self._session is not None:
            await self._wait_in_flight(self._session)
        if self._spool is not None:
            self._keeper.persist(self._session)
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
                await stop_consumer(session, self._request_timeout + 1)
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
            self._keeper.persist(self._session)
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

    async def _open_session(self, keep_consumer: bool, budget: float | None = None) -> Session:
        """A new session, within `budget` seconds (default: the larger of the delivery and
        request timeouts)."""
        if budget is None:
            budget = max(self._delivery_timeout, self._request_timeout)
        session = await open_session(
            self._kafka,
            self._topic,
            self._sessions + 1,
            self._producer_options,
            keep_consumer=keep_consumer,
            budget=budget,
            request_timeout=self._request_timeout,
        )
        self._sessions = session.number
        if self._outage_logged:
            log.info("broker reachable again", extra={"topic": self._topic})
            self._outage_logged = False
        return session

    async def _hand_over(
        self,
        session: Session,
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
            self._keeper.reject(key, seq, exc)
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
        entry = Pending(self._deliver, session, key, value, timestamp_ms, seq, sent_at, future)
        session.pending.append(entry)
        session.unacked += 1
        future.add_done_callback(entry)
        return _Outcome.ACCEPTED

    def _on_delivery(self, entry: Pending, future: asyncio.Future[Any]) -> None:
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
                    "symbol": symbol(entry.key),
                    "latency_ms": round(latency * 1000, 3),
                    "from_spool": entry.seq is not None,
                },
            )

    def _fail_session(self, session: Session, reason: str, exc: BaseException) -> None:
        """Give the session up, now (synchronously, so nothing can slip in between): stop its
        sender, move its unacknowledged records to the spool in send order, switch to SPOOL."""
        if session.dead:
            return
        session.dead = True
        if self._session is session:
            self._session = None
        self._mode = _Mode.SPOOL
        stop_sending(session.producer)
        unacked = [e for e in session.pending if not e.done]
        session.pending.clear()
        error = repr(exc)
        for e in unacked:
            log.warning(
                "delivery failed; record spooled",
                extra={
                    "topic": self._topic,
                    "partition": partition_for(e.key, session.partitions),
                    "offset": None,
                    "symbol": symbol(e.key),
                    "reason": reason,
                    "error": error,
                    "spool_seq": e.seq,
                },
            )
        if unacked:
            self._count_failed(len(unacked), reason)
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
        self._keeper.in_doubt(direct, session)
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
        task = asyncio.get_running_loop().create_task(
            abort(session, aborted, self._request_timeout)
        )
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        self._wakeup.set()

    def _count_failed(self, records: int, reason: str) -> None:
        self.failed += records
        self._m.failed[reason if reason in self._m.failed else "error"].inc(records)

    async def _await_aborts(self) -> None:
        if self._aborts:
            await asyncio.wait(set(self._aborts))

    async def _wait_in_flight(self, session: Session) -> None:
        """Until the session has nothing unacknowledged or has failed (the housekeeping
        fails it when the oldest record passes the delivery timeout, which also ends the
        client's flush: its batches are failed)."""
        while not session.dead and session.unacked:
            await session.producer.flush()
            await asyncio.sleep(0)  # let the per-record delivery callbacks run

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
            except KafkaAccessError as exc:
                self._refuse(exc)
                return
            except Exception as exc:
                self._log_outage("spool not drained: broker unavailable, will retry", exc)
                await asyncio.sleep(self._retry_seconds)

    def _refuse(self, exc: KafkaAccessError) -> None:
        self._refused = exc
        log.error(
            "Kafka refused the producer; not retrying",
            extra={"topic": self._topic, "error": str(exc), "spool_pending": self.spool_pending},
        )

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
                await stop_consumer(session, self._request_timeout + 1)
            spool.rewind()
            self._keeper.set_baseline(session)
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
                self._keeper.hand_out(session, chunk[-1].seq)
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

    async def _reconcile(self, session: Session) -> None:
        """Acknowledge, instead of sending them again, the spooled records an earlier session
        may have delivered without an acknowledgement and that are in the topic."""
        spool = self._spool
        assert spool is not None
        result = await find_delivered(spool, session, self._topic, self._delivery_timeout)
        if result is None:
            return
        found = result.found
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
                    "symbol": symbol(record.key),
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
                "in_doubt": result.in_doubt,
                "already_delivered": len(found),
                "to_resend": result.in_doubt - len(found),
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
            self._keeper.persist(self._session)
        self._publish()

    def _publish(self) -> None:
        if self._latencies:
            latencies, self._latencies = self._latencies, []
            self._m.observe_deliveries(latencies)
        self._m.publish_sent(self.sent)
        self._m.spool_pending.set(self.spool_pending)
        self._m.spooling.set(0 if self._mode is _Mode.DIRECT else 1)
