"""The warehouse loader: `stock-quotes-aggregated` -> DuckDB or BigQuery (base.py).

Where it runs
-------------
Inside the Faust worker as a `ConsumerService` (kafka/consumer_service.py) with its OWN consumer
group `<app id>-warehouse`, not as an agent on the aggregated topic: a loader that must block
during a warehouse outage would stop the one fetch loop all agents share, and with it the
aggregation. Measured with faust-streaming 0.15.3, the agent version of this loader
(`noack_take`) and an unreachable BigQuery endpoint, 3,464 quotes -> 288 windows: when 20,000
records reached the aggregated topic while the worker ran, the aggregation processed 0 quotes in
90 s (597 with `broker_max_poll_records=500`); with that backlog there before the start, 264 of
288 windows came out and the idle-flushed rest never did; SIGTERM hung (Faust waits for an
agent's unacknowledged events). This service, same runs: all 288 windows in 5-7 s in every
case, SIGTERM done in 1.5 s (tests/integration/test_warehouse.py keeps the backlog case).

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

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import orjson
from aiokafka import TopicPartition

from stockstream.contracts.dead_letters import Reason
from stockstream.deadletter import DeadLetters
from stockstream.kafka.consumer_service import ConsumerService
from stockstream.metrics import (
    WAREHOUSE_BATCH_SECONDS,
    WAREHOUSE_FAILURES,
    WAREHOUSE_LAST_SUCCESS,
    WAREHOUSE_PENDING,
    WAREHOUSE_ROWS,
    WAREHOUSE_UP,
)
from stockstream.retry import Backoff, retry
from stockstream.settings import Settings
from stockstream.warehouse.base import Rejected, Warehouse, WarehouseUnavailable

log = logging.getLogger(__name__)

_WRITTEN, _REJECTED = WAREHOUSE_ROWS.labels("written"), WAREHOUSE_ROWS.labels("rejected")
BACKOFF = Backoff(initial_seconds=0.5, max_seconds=10.0)


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


class WarehouseLoader(ConsumerService):
    """Consumes the aggregated topic with its own consumer group and loads it (module doc)."""

    name = "warehouse loader"

    def __init__(
        self,
        settings: Settings,
        warehouse: Warehouse,
        dead_letters: DeadLetters,
        group_id: str | None = None,
    ) -> None:
        conf = settings.warehouse
        super().__init__(
            settings,
            settings.kafka.aggregated_topic,
            group_id or f"{settings.worker.app_id}-warehouse",
            # One write attempt (BigQuery: up to WAREHOUSE_RETRY_DEADLINE_SECONDS) happens
            # between two polls; the group must not evict the loader meanwhile.
            max_poll_interval_ms=int(max(300.0, 2 * conf.retry_deadline_seconds + 60) * 1000),
        )
        self.conf = conf
        self.warehouse = warehouse
        self.dead_letters = dead_letters
        self._owned: set[TopicPartition] = set()
        self._batch: list[Any] = []  # ConsumerRecords, in poll order
        self._batch_started = 0.0

    def describe(self) -> dict[str, Any]:
        return {"backend": self.warehouse.name}

    async def consume(self) -> None:
        WAREHOUSE_UP.set(1)
        while True:
            room = self.conf.batch_rows - len(self._batch)
            polled = await self.consumer.getmany(
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

    async def on_stop(self) -> None:
        self._batch.clear()
        self._owned.clear()
        await self.warehouse.close()

    def resumable(self) -> set[TopicPartition]:
        return self._owned

    async def on_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self._owned = set(assigned)

    async def on_revoked(self, revoked: Collection[TopicPartition]) -> None:
        gone = set(revoked)
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
        written = await self._write_with_retry(records)
        offsets: dict[TopicPartition, int] = {}
        for record in written:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, -1), record.offset + 1)
        await self.commit({tp: o for tp, o in offsets.items() if tp in self._owned})

    async def _write_with_retry(self, records: list[Any]) -> list[Any]:
        """Write until the warehouse acknowledged the batch; returns the records written
        (those of partitions revoked meanwhile are left out: their new owner has them)."""
        started = time.perf_counter()
        attempts = pending = 0

        async def attempt() -> list[Any]:
            nonlocal attempts, pending
            mine = [r for r in records if TopicPartition(r.topic, r.partition) in self._owned]
            if mine:
                attempts, pending = attempts + 1, len(mine)
                WAREHOUSE_PENDING.set(pending)
                await self._write_once(mine)
            return mine

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            WAREHOUSE_FAILURES.inc()
            WAREHOUSE_UP.set(0)
            unavailable = isinstance(exc, WarehouseUnavailable)
            fields = {
                "backend": self.warehouse.name,
                "rows": pending,
                "attempt": retries,
                "retry_in_s": round(pause, 3),
                "error": str(exc) if unavailable else repr(exc),
            }
            if unavailable:
                log.error("warehouse unavailable, batch retried later", extra=fields)
            else:
                log.error("warehouse write failed, batch retried later", exc_info=exc, extra=fields)

        # Forever: an outage loses nothing (Kafka keeps the data) and needs no operator.
        written = await retry(
            attempt, BACKOFF, what="warehouse write", on_failure=failed, sleep=self.wait_paused
        )
        if attempts > 1:
            log.warning(
                "warehouse available again",
                extra={
                    "backend": self.warehouse.name,
                    "attempts": attempts,
                    "waited_s": round(time.perf_counter() - started, 3),
                },
            )
        if written:
            WAREHOUSE_UP.set(1)
            WAREHOUSE_PENDING.set(0)
            WAREHOUSE_LAST_SUCCESS.set(time.time())
            WAREHOUSE_BATCH_SECONDS.observe(time.perf_counter() - started)
        return written

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
        batch = self.dead_letters.batch()
        for rejected in refused:
            await batch.add(
                records[rejected.index],
                Reason.WAREHOUSE_REJECTED,
                f"{self.warehouse.name} rejected the row: {rejected.error}",
            )
        # Delivered before the offsets are committed: the DLQ is the records' only home.
        await batch.deliver()
        _WRITTEN.inc(len(records) - len(refused))
        _REJECTED.inc(len(refused))
        log.debug(
            "warehouse batch written",
            extra={"backend": self.warehouse.name, "rows": len(records), "rejected": len(refused)},
        )
