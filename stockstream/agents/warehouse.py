"""The warehouse loader: `stock-quotes-aggregated` -> DuckDB or BigQuery (sinks/warehouse.py).

Where it runs, and why not as a Faust agent
-------------------------------------------
It runs inside the Faust worker as a service with its OWN Kafka consumer (group
`<app id>-warehouse`), not as an `@app.agent` on the aggregated topic. All Faust agents share
one consumer whose fetch loop hands each record to its agent's buffer and *waits* when that
buffer is full. A loader that blocks during a warehouse outage (it must: nothing may be
committed before the warehouse acknowledged it) then stops the whole fetch loop, so the
aggregation of quotes stops too. Measured with faust-streaming 0.15.3, the agent version of
this loader (`noack_take`) and an unreachable BigQuery endpoint, 3,464 quotes -> 288 windows:
when 20,000 records reached the aggregated topic while the worker ran, the aggregation
processed 0 quotes in 90 s (597 with `broker_max_poll_records=500`: Faust's pause on buffer
pressure does not prevent it); with that backlog there before the start, 264 of 288 windows
came out and the idle-flushed rest never did; without a backlog, or with a healthy warehouse,
all 288 came out in 5-8 s. SIGTERM hung as well: Faust waits for an agent's unacknowledged
events before a rebalance and at shutdown (`stream_wait_empty`). This service, same runs: all
288 windows in 5-7 s in every case, SIGTERM done in 1.5 s
(tests/integration/test_warehouse.py keeps the backlog case).

Batches and guarantees
----------------------
Records are collected into a batch of up to `WAREHOUSE_BATCH_ROWS` records or
`WAREHOUSE_BATCH_SECONDS` after its first record, whichever comes first (across partitions).
The batch is written, the records the warehouse refuses are sent to `stock-quotes-dlq`
(reason `warehouse-rejected`, the warehouse's error) and delivered, and only then are the
batch's offsets committed. A crash or a rebalance before the commit means the batch is read
again; the back-ends make that harmless: DuckDB upserts on `(symbol, window_start)`,
BigQuery gets the same insert ids and the models deduplicate.

Failures
--------
A warehouse outage (or any unexpected error) never loses a record and never stops the worker:
the same batch is retried with exponential backoff (`stockstream_warehouse_up` is 0, each
attempt is logged and counted) while the loader pauses its partitions and keeps polling, so
its consumer stays in the group and Kafka keeps the data. When the warehouse answers again the
loader catches up on its own. The aggregation agent is not involved at all.

Metrics: `stockstream_warehouse_rows_total{outcome}` (written, rejected),
`stockstream_warehouse_failures_total`, `stockstream_warehouse_up`,
`stockstream_warehouse_pending_rows`, `stockstream_warehouse_batch_seconds`,
`stockstream_warehouse_last_success_timestamp_seconds`, and
`stockstream_dead_letters_total{reason="warehouse-rejected"}`.

Active only with `WAREHOUSE_ENABLED=true` (the default).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service
from prometheus_client import Counter, Gauge, Histogram

from stockstream.agents.backoff import sleep_polling_paused
from stockstream.application import app, dlq_topic, settings
from stockstream.contracts import Reason
from stockstream.deadletter import send_dead_letter
from stockstream.metrics import REGISTRY
from stockstream.settings import Settings
from stockstream.sinks.warehouse import (
    Rejected,
    Warehouse,
    WarehouseConfigError,
    WarehouseUnavailable,
    from_settings,
)
from stockstream.topics import bootstrap_list

log = logging.getLogger(__name__)

WAREHOUSE_ROWS = Counter(
    "stockstream_warehouse_rows_total",
    "Aggregated windows handled by the warehouse loader, by outcome"
    " (written = acknowledged by the warehouse, rejected = dead-lettered)",
    ["outcome"],
    registry=REGISTRY,
)
WAREHOUSE_FAILURES = Counter(
    "stockstream_warehouse_failures_total",
    "Failed warehouse write attempts; the batch is retried after a backoff",
    registry=REGISTRY,
)
WAREHOUSE_UP = Gauge(
    "stockstream_warehouse_up",
    "1 while warehouse writes succeed, 0 while they fail (batch waiting for a retry)",
    registry=REGISTRY,
)
WAREHOUSE_PENDING = Gauge(
    "stockstream_warehouse_pending_rows",
    "Records of the batch currently waiting for the warehouse",
    registry=REGISTRY,
)
WAREHOUSE_BATCH_SECONDS = Histogram(
    "stockstream_warehouse_batch_seconds",
    "Time from a batch's first write attempt to the warehouse's acknowledgement",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
WAREHOUSE_LAST_SUCCESS = Gauge(
    "stockstream_warehouse_last_success_timestamp_seconds",
    "Unix time of the last batch acknowledged by the warehouse",
    registry=REGISTRY,
)
_WRITTEN, _REJECTED = WAREHOUSE_ROWS.labels("written"), WAREHOUSE_ROWS.labels("rejected")

BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0


def _decode(value: bytes | None) -> tuple[Mapping[str, Any] | None, str]:
    """(record, error): the aggregated record as a JSON object, or why it is not one."""
    if value is None:
        return None, "empty value (tombstone)"
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return None, f"not UTF-8 JSON: {exc}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, ""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loader: WarehouseLoader) -> None:
        self.loader = loader

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.loader.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.loader.on_assigned(assigned)


class WarehouseLoader:
    """Consumes the aggregated topic with its own consumer group and loads it (module doc)."""

    def __init__(
        self, settings: Settings, warehouse: Warehouse, group_id: str | None = None
    ) -> None:
        self.settings = settings
        self.conf = settings.warehouse
        self.warehouse = warehouse
        self.topic = settings.kafka.aggregated_topic
        self.group_id = group_id or f"{settings.worker.app_id}-warehouse"
        self._consumer: Any = None
        self._owned: set[TopicPartition] = set()
        self._batch: list[Any] = []  # ConsumerRecords, in poll order
        self._batch_started = 0.0

    # -- consumer lifecycle -------------------------------------------------------------

    def _new_consumer(self) -> Any:
        session = self.settings.worker.session_timeout_seconds
        return AIOKafkaConsumer(
            bootstrap_servers=bootstrap_list(self.settings),
            group_id=self.group_id,
            client_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self.settings.worker.consumer_auto_offset_reset,
            isolation_level="read_committed",
            session_timeout_ms=int(session * 1000),
            heartbeat_interval_ms=int(min(3.0, session / 3) * 1000),
            # One write attempt (BigQuery: up to WAREHOUSE_RETRY_DEADLINE_SECONDS) happens
            # between two polls; the group must not evict the loader meanwhile.
            max_poll_interval_ms=int(max(300.0, 2 * self.conf.retry_deadline_seconds + 60) * 1000),
        )

    async def run(self) -> None:
        """Consume and load until cancelled."""
        consumer = self._consumer = self._new_consumer()
        consumer.subscribe([self.topic], listener=_Listener(self))
        await consumer.start()
        log.info(
            "warehouse loader started",
            extra={"topic": self.topic, "group": self.group_id, "backend": self.warehouse.name},
        )
        WAREHOUSE_UP.set(1)
        try:
            while True:
                room = self.conf.batch_rows - len(self._batch)
                polled = await consumer.getmany(
                    timeout_ms=self._poll_timeout_ms(), max_records=max(1, room)
                )
                for tp, records in polled.items():
                    if tp not in self._owned:
                        continue
                    if records and not self._batch:
                        self._batch_started = time.monotonic()
                    self._batch.extend(records)
                if self._batch and (
                    len(self._batch) >= self.conf.batch_rows
                    or time.monotonic() - self._batch_started >= self.conf.batch_seconds
                ):
                    await self._flush()
        finally:
            self._batch.clear()
            self._owned.clear()
            await consumer.stop()
            await self.warehouse.close()

    def on_assigned(self, assigned: Any) -> None:
        self._owned = {tp for tp in assigned if tp.topic == self.topic}
        log.info(
            "warehouse partitions assigned",
            extra={"partitions": sorted(tp.partition for tp in self._owned)},
        )

    def on_revoked(self, revoked: Any) -> None:
        gone = {tp for tp in revoked if tp.topic == self.topic}
        self._owned -= gone
        left = [r for r in self._batch if TopicPartition(r.topic, r.partition) in gone]
        if left:
            # Uncommitted: the partitions' next owner reads them again.
            self._batch = [
                r for r in self._batch if TopicPartition(r.topic, r.partition) not in gone
            ]
            log.info(
                "warehouse partitions revoked, unwritten records left to the new owner",
                extra={"records": len(left)},
            )

    def _poll_timeout_ms(self) -> int:
        if not self._batch:
            return 1000
        left = self._batch_started + self.conf.batch_seconds - time.monotonic()
        return int(max(0.01, min(1.0, left)) * 1000)

    # -- a batch ------------------------------------------------------------------------

    async def _flush(self) -> None:
        records, self._batch = self._batch, []
        records = await self._write_with_retry(records)
        if records:
            await self._commit(records)

    async def _write_with_retry(self, records: list[Any]) -> list[Any]:
        """Write until the warehouse acknowledged the batch; returns the records written
        (those of partitions revoked meanwhile are left out: their new owner has them)."""
        started = time.perf_counter()
        delay = BACKOFF_INITIAL_SECONDS
        attempts = 0
        while True:
            records = [r for r in records if TopicPartition(r.topic, r.partition) in self._owned]
            if not records:
                return []
            WAREHOUSE_PENDING.set(len(records))
            attempts += 1
            try:
                await self._write_once(records)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                WAREHOUSE_FAILURES.inc()
                WAREHOUSE_UP.set(0)
                fields = {
                    "backend": self.warehouse.name,
                    "rows": len(records),
                    "attempt": attempts,
                    "retry_in_s": delay,
                    "error": str(exc) if isinstance(exc, WarehouseUnavailable) else repr(exc),
                }
                if isinstance(exc, WarehouseUnavailable):
                    log.error("warehouse unavailable, batch retried later", extra=fields)
                else:
                    log.exception("warehouse write failed, batch retried later", extra=fields)
                await self._backoff(delay)
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
        if attempts > 1:
            log.warning(
                "warehouse available again",
                extra={
                    "backend": self.warehouse.name,
                    "attempts": attempts,
                    "waited_s": round(time.perf_counter() - started, 3),
                },
            )
        WAREHOUSE_UP.set(1)
        WAREHOUSE_PENDING.set(0)
        WAREHOUSE_LAST_SUCCESS.set(time.time())
        WAREHOUSE_BATCH_SECONDS.observe(time.perf_counter() - started)
        return records

    async def _write_once(self, records: Sequence[Any]) -> None:
        """One attempt: write, then dead-letter (and deliver) what the warehouse refused."""
        rows: list[Mapping[str, Any]] = []
        positions: list[int] = []  # rows[i] is records[positions[i]]
        refused: list[Rejected] = []
        for position, record in enumerate(records):
            row, error = _decode(record.value)
            if row is None:
                refused.append(Rejected(position, error))
            else:
                positions.append(position)
                rows.append(row)
        if rows:
            for rejected in await self.warehouse.write(rows):
                refused.append(Rejected(positions[rejected.index], rejected.error))
        for rejected in refused:
            record = records[rejected.index]
            await send_dead_letter(
                dlq_topic,
                key=record.key,
                value=record.value,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=Reason.WAREHOUSE_REJECTED,
                error=f"{self.warehouse.name} rejected the row: {rejected.error}",
            )
        if refused:
            # Delivered before the offsets are committed: the DLQ is the records' only home.
            await app.producer.flush()
        _WRITTEN.inc(len(records) - len(refused))
        _REJECTED.inc(len(refused))
        log.debug(
            "warehouse batch written",
            extra={"backend": self.warehouse.name, "rows": len(records), "rejected": len(refused)},
        )

    async def _commit(self, records: Sequence[Any]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, -1), record.offset + 1)
        owned = {tp: offset for tp, offset in offsets.items() if tp in self._owned}
        if not owned:
            return
        try:
            await self._consumer.commit(owned)
        except (KafkaError, AssertionError) as exc:
            # Written but not committed: read again later, and written again idempotently.
            log.warning(
                "warehouse offset commit failed",
                extra={"offsets": {str(tp): o for tp, o in owned.items()}, "error": repr(exc)},
            )

    async def _backoff(self, seconds: float) -> None:
        await sleep_polling_paused(self._consumer, seconds, lambda: self._owned)


class WarehouseService(Service):
    """Runs the loader for the worker's lifetime; restarts it after an unexpected error."""

    async def on_start(self) -> None:
        self.loader = WarehouseLoader(settings, _warehouse)

    @Service.task
    async def _supervise(self) -> None:
        while not self.should_stop:
            try:
                await self.loader.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warehouse loader crashed, restarting in 5 s")
                await self.sleep(5.0)


if settings.warehouse.enabled:
    try:
        # Not connected yet (the first write connects): only the configuration is checked.
        _warehouse = from_settings(settings)
    except WarehouseConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    app.service(WarehouseService)
