"""The base of every service that consumes a topic with its OWN consumer group inside the
worker: the raw archive and the warehouse loader today, later loaders tomorrow.

Why not Faust agents: all agents of a Faust app share one consumer whose fetch loop hands each
record to every subscribed agent's buffer and waits when a buffer is full, and an offset is
committed only once every agent on the topic acked it. A sink that must wait for its storage
(nothing may be committed before the storage acknowledged it) would therefore stop the
aggregation as well, and SIGTERM would hang on the unacknowledged events. Measured with
faust-streaming 0.15.3: a blocked second agent on `stock-quotes` stalled the aggregation at
4,197 of 50,000 records; an agent version of the warehouse loader let 0 of 288 windows out while
a backlog met a warehouse outage. With a consumer of its own, a service's back-pressure pauses
only its own fetches (README, "Raw archive" and "Warehouse").

What every such service shares, and gets here:
- a consumer built from the one connection config, committing by hand only what its sink has
  stored (`read_committed`, no auto-commit, the worker's session timeout);
- rebalance callbacks routed to `on_assigned` / `on_revoked`;
- `wait_paused(seconds)`: waiting out a failing sink while still polling with every partition
  paused, so the group does not evict the consumer (Kafka keeps the data meanwhile);
- `commit(offsets)`: a failed commit is logged and counted, never fatal (the records are read
  again and the sinks write idempotently);
- `ConsumerServiceRunner`: runs the service for the worker's lifetime and restarts it after an
  unexpected error, except a `KafkaAccessError` (refused credentials or TLS), which stops the
  worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service

from stockstream.kafka import clients
from stockstream.settings import Settings

log = logging.getLogger(__name__)

#: Pause between an unexpected crash of a service and its restart.
RESTART_DELAY_SECONDS = 5.0


class ConsumerService(ABC):
    """A loop over one topic with its own consumer group. Subclasses implement `consume`
    (the loop, until cancelled), the rebalance hooks and `on_stop`."""

    #: Short name for logs, e.g. "archive".
    name = "consumer"

    def __init__(
        self, settings: Settings, topic: str, group_id: str, **consumer_options: Any
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.group_id = group_id
        self._consumer_options = consumer_options
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError(f"{self.name}: the consumer is not running")
        return self._consumer

    def describe(self) -> dict[str, Any]:
        """Extra fields for the "started" log line."""
        return {}

    # -- lifecycle -----------------------------------------------------------------------

    def new_consumer(self) -> AIOKafkaConsumer:
        worker = self.settings.worker
        session = worker.session_timeout_seconds
        options: dict[str, Any] = {
            "group_id": self.group_id,
            "client_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": worker.consumer_auto_offset_reset,
            "isolation_level": "read_committed",
            "session_timeout_ms": int(session * 1000),
            "heartbeat_interval_ms": int(min(3.0, session / 3) * 1000),
            **self._consumer_options,
        }
        return clients.consumer(self.settings.kafka, **options)

    async def run(self) -> None:
        """Consume until cancelled (or until `consume` raises)."""
        consumer = self._consumer = self.new_consumer()
        consumer.subscribe([self.topic], listener=_Listener(self))
        await clients.start(consumer, self.settings.kafka)
        log.info(
            f"{self.name} started",
            extra={"topic": self.topic, "group": self.group_id, **self.describe()},
        )
        try:
            await self.consume()
        finally:
            try:
                await self.on_stop()
            finally:
                self._consumer = None
                await consumer.stop()

    @abstractmethod
    async def consume(self) -> None:
        """The poll loop; runs until cancelled."""

    @abstractmethod
    async def on_stop(self) -> None:
        """Release what the service holds (called before the consumer stops)."""

    # -- rebalances ----------------------------------------------------------------------

    @abstractmethod
    async def on_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """Partitions of `self.topic` now owned."""

    @abstractmethod
    async def on_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Partitions of `self.topic` no longer owned; uncommitted work on them is left to
        their next owner."""

    def resumable(self) -> Iterable[TopicPartition]:
        """Partitions to resume after `wait_paused` (default: all assigned)."""
        assigned: set[TopicPartition] = self.consumer.assignment()
        return assigned

    # -- helpers for subclasses ----------------------------------------------------------

    async def wait_paused(self, seconds: float) -> None:
        """Sleep `seconds` with every partition paused but still polling: a consumer that
        stops polling is evicted from its group after max.poll.interval. Afterwards the
        partitions `resumable()` names (evaluated then: the assignment may have changed) are
        resumed."""
        consumer = self.consumer
        consumer.pause(*consumer.assignment())
        try:
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                stray = await consumer.getmany(timeout_ms=max(1, int(left * 1000)))
                for tp, records in stray.items():  # cannot happen while paused; never drop
                    if records:
                        consumer.seek(tp, records[0].offset)
        finally:
            ready = [tp for tp in self.resumable() if tp in consumer.assignment()]
            if ready:
                consumer.resume(*ready)

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit `offsets` (next offset to read per partition). False when the commit failed:
        the records are then read again later, which the sinks absorb (they write
        idempotently), so it is logged and counted, never raised."""
        if not offsets:
            return True
        try:
            await self.consumer.commit(offsets)
        except (KafkaError, AssertionError) as exc:
            log.warning(
                f"{self.name} offset commit failed",
                extra={
                    "topic": self.topic,
                    "offsets": {tp.partition: o for tp, o in offsets.items()},
                    "error": repr(exc),
                },
            )
            return False
        return True


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: ConsumerService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        mine = [tp for tp in revoked if tp.topic == self.service.topic]
        await self.service.on_revoked(mine)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        mine = [tp for tp in assigned if tp.topic == self.service.topic]
        log.info(
            f"{self.service.name} partitions assigned",
            extra={"topic": self.service.topic, "partitions": sorted(tp.partition for tp in mine)},
        )
        await self.service.on_assigned(mine)


async def supervise(
    service: ConsumerService,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """Run `service` until cancelled or `stopping()`, restarting it `RESTART_DELAY_SECONDS`
    after an unexpected error. A `KafkaAccessError` (refused credentials or TLS) is raised: a
    restart would be refused too, so the caller stops (the worker, or the child process it
    runs the service in)."""
    while not stopping():
        try:
            await service.run()
        except (asyncio.CancelledError, clients.KafkaAccessError):
            raise
        except Exception:
            log.exception(
                f"{service.name} crashed, restarting in {RESTART_DELAY_SECONDS:g} s",
                extra={"topic": service.topic},
            )
            await sleep(RESTART_DELAY_SECONDS)


class ConsumerServiceRunner(Service):
    """Runs a `ConsumerService` in the worker's process for the worker's lifetime (a mode
    service the Faust app starts after table recovery and stops with the worker); restarts it
    after an unexpected error. service_process.py runs one in a child process instead."""

    def __init__(self, service: ConsumerService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service

    @property
    def label(self) -> str:
        return f"{type(self).__name__}({self.service.name})"

    @Service.task
    async def _supervise(self) -> None:
        try:
            await supervise(self.service, self.sleep, lambda: self.should_stop)
        except clients.KafkaAccessError as exc:
            # Crash the service, which stops the worker with this message.
            log.critical(
                f"{self.service.name} cannot access Kafka: {exc}",
                extra={"topic": self.service.topic},
            )
            await self.crash(exc)
