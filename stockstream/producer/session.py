"""A producer session: one idempotent aiokafka producer and the records handed to it.

The quote producer gives a session up as a whole when one delivery fails, and opens a new one
to drain the spool (quote_producer.py). Here: what a session holds, opening one (with the end
offsets of the topic's partitions: the floors the reconciliation searches from), and giving one
up at once. aiokafka has no way to do that last part (`stop()` waits for every batch, which with
idempotence and an unreachable broker is forever), so `stop_sending` and `dispose` reach into
its internals; their comments say which and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from stockstream.errors import StockstreamError
from stockstream.kafka import clients
from stockstream.settings import KafkaSettings

_PARTITIONER = DefaultPartitioner()


class SessionAborted(StockstreamError, KafkaError):
    """The producer session was given up after a delivery failure; its records are spooled.

    A KafkaError too: it is what aiokafka's failed batches (and their futures) carry."""


class Session:
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
        self.pending: deque[Pending] = deque()  # in send order
        self.dead = False
        self.active_sends = 0  # send() calls inside producer.send right now
        self.unacked = 0  # handed over, not acknowledged yet
        self.baseline = False  # the spool's reconciliation baseline is this session's

    def floors_json(self) -> dict[str, int]:
        return {str(p): o for p, o in self.floors.items()}


class Pending:
    """A record handed to a session; called back by its delivery future, it passes the call
    on to `on_delivery` (the producer's)."""

    __slots__ = (
        "done",
        "future",
        "key",
        "on_delivery",
        "sent_at",
        "seq",
        "session",
        "timestamp_ms",
        "value",
    )

    def __init__(
        self,
        on_delivery: Callable[[Pending, asyncio.Future[Any]], None],
        session: Session,
        key: bytes | None,
        value: bytes,
        timestamp_ms: int | None,
        seq: int | None,
        sent_at: float,
        future: asyncio.Future[Any],
    ) -> None:
        self.on_delivery = on_delivery
        self.session = session
        self.key = key
        self.value = value
        self.timestamp_ms = timestamp_ms
        self.seq = seq  # spool sequence number, None when sent directly
        self.sent_at = sent_at
        self.future = future
        self.done = False

    def __call__(self, future: asyncio.Future[Any]) -> None:
        self.on_delivery(self, future)


def symbol(key: bytes | None) -> str | None:
    """The symbol a record key names, for logs."""
    return None if key is None else key.decode("utf-8", "replace")


def partition_for(key: bytes | None, partitions: list[int]) -> int | None:
    """The partition aiokafka's default partitioner picks for `key` (murmur2, like Java)."""
    if key is None or not partitions:
        return None
    return int(_PARTITIONER(key, partitions, partitions))


async def open_session(
    kafka: KafkaSettings,
    topic: str,
    number: int,
    producer_options: dict[str, Any],
    *,
    keep_consumer: bool,
    budget: float,
    request_timeout: float,
) -> Session:
    """Start a producer, learn the partitions and their end offsets (the floors), within
    `budget` seconds. With `keep_consumer` the session keeps the consumer that read the end
    offsets, for the reconciliation. On failure nothing is left running."""
    producer = clients.producer(
        kafka, **producer_options, client_id=f"stockstream-{topic}-{number}"
    )
    consumer: AIOKafkaConsumer | None = None
    try:
        async with asyncio.timeout(budget):
            await clients.start(producer, kafka)
            partitions = sorted(await producer.partitions_for(topic))
            consumer = clients.consumer(
                kafka,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                client_id=f"stockstream-{topic}-reconcile",
            )
            await clients.start(consumer, kafka)
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    except BaseException as exc:
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        stop_sending(producer)
        await dispose(producer, SessionAborted(repr(exc)), request_timeout)
        raise
    if not keep_consumer:
        await consumer.stop()
        consumer = None
    return Session(
        number,
        producer,
        partitions,
        {tp.partition: o for tp, o in ends.items()},
        consumer,
    )


async def stop_consumer(session: Session, wait_seconds: float) -> None:
    consumer, session.consumer = session.consumer, None
    if consumer is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), wait_seconds)


def stop_sending(producer: AIOKafkaProducer) -> None:
    """Stop a session's aiokafka producer from sending anything more, now (synchronously).

    `AIOKafkaProducer.stop()` would wait until every batch is delivered, which with
    idempotence and an unreachable broker is forever. Cancelling the sender task is enough
    to stop new produce requests (only it drains batches, retries included); `dispose`
    finishes the job."""
    sender: Any = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()


async def dispose(producer: AIOKafkaProducer, exc: BaseException, wait_seconds: float) -> None:
    """After `stop_sending`: close the connections (requests in flight fail at once), let
    the cancelled sender task finish, then fail every batch still held, so their futures --
    and any send() waiting for room in a full batch -- return. In that order: failing batches
    while the sender still runs trips aiokafka's own bookkeeping of retried batches."""
    client: Any = producer.client
    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as the
    # close completes, and the cancelled caller (the spool drain, at close()) runs on.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait_seconds):
            await client.close()
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


async def abort(session: Session, exc: SessionAborted, request_timeout: float) -> None:
    """The rest of giving a session up, after `stop_sending`: dispose of its producer, wait
    for the send() calls that were inside it, stop its consumer."""
    await dispose(session.producer, exc, request_timeout)
    # send() calls that were inside the session have returned now (its batches are
    # failed); wait until they have spooled their records before a new session starts.
    deadline = time.monotonic() + request_timeout + 1
    # Polled: an Event set/cleared around every send would cost the hot path.
    while session.active_sends and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await stop_consumer(session, request_timeout + 1)
