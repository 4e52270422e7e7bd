"""The raw archive (bronze layer): every valid record of `stock-quotes` into object storage,
in batched Parquet objects, once each, also across crashes and storage outages.

Where it runs
-------------
Part of the Faust worker, as a `ConsumerService` (kafka/consumer_service.py) with its OWN
consumer group `<app id>-archive`, not as a second agent on `stock-quotes`: an archive waiting
for storage would otherwise stall the aggregation (measured: 4,197 of 50,000 records, and
SIGTERM hung; the base's docstring has the details). Its own consumer gives it its own position
and commits; its back-pressure pauses only its own fetches (tests/integration/test_archive.py).
By default in a child process the worker starts, stops and restarts (service_process.py), so
its CPU is not the aggregation's; ARCHIVE_PROCESS=inline keeps it in the worker's event loop.

Batches
-------
Per partition, records are buffered until ARCHIVE_BATCH_RECORDS records or
ARCHIVE_BATCH_BYTES bytes (key + value) are reached or the first one is ARCHIVE_BATCH_SECONDS
old. A batch is a contiguous offset range of one partition; it becomes one Parquet object per
UTC (date, hour) of `market_timestamp` (parquet.py has the layout and schema). Parsing,
validation and encoding run in a thread, like the storage calls: the event loop stays free.

What is archived: valid quotes, with typed columns. Records that break the contract (malformed,
invalid) are not: the aggregation agent already dead-letters them with their reason, so the
DLQ is their one home; the archive counts them in `stockstream_archive_skipped_total{reason}`.
The "too far in the future" check uses the record's Kafka timestamp instead of the wall clock,
so re-reading a batch classifies it identically (see below).

Exactly once in the archive
---------------------------
Offsets are committed only after the batch's objects are stored (at-least-once), and
re-writing is made exact, not just "probably the same", because after a crash the re-read
records could be cut into different batches (batch boundaries depend on timing) and overlapping
objects would duplicate rows. Each partition has a small manifest object,
`_progress/<topic>/partition-<p>.json`, in the same store (manifest.py):

1. before a batch's objects are written: `{"through": X, "pending": {"first": f, "last": l}}`
   (the intent: the next batch is exactly offsets f..l);
2. the objects: keys and bytes are a deterministic function of the records f..l;
3. then `{"through": l, "pending": null}`; then the Kafka commit of l + 1.

On assignment the partition starts at max(through + 1, committed offset). A crash after 1 (and
before 3) leaves the intent: the restarted archive cuts its first batch exactly at `l` again
and re-creates the same keys with the same bytes (already-written ones are overwritten with
identical content, missing ones are written). A crash after 3 only re-reads records at or below
`through`, which are skipped. Storage and Kafka stay consistent whatever the crash point; the
price is two small manifest PUTs per batch and partition. (A zombie worker that lost its
partitions without noticing could still write; revocation waits for the in-flight storage call
and stops further ones, which closes the ordinary rebalance case.)

Failures
--------
Every storage call is retried with exponential back-off and jitter (ARCHIVE_BACKOFF_*). While
it waits, the archive pauses its partitions and keeps polling its consumer (so the group does
not evict it), i.e. back-pressure: Kafka keeps the data. After ARCHIVE_MAX_RETRIES retries:

- `block` (default): keep retrying at the maximum back-off; `stockstream_archive_blocked` is 1.
  Nothing is lost, nothing is committed, the archive resumes where it stopped.
- `dead-letter`: the records of every object of the batch that could not be stored go to
  `stock-quotes-dlq` with reason `archive-failed` (the send is awaited before the commit);
  objects already stored stay. Then the offset is committed and the archive moves on.
  `stockstream dlq redrive` (rearchive.py) writes them into the archive once storage is
  back. Under this policy a manifest that cannot be read when a partition is
  assigned is treated as absent, so a batch a crash left half-written may be re-cut: rows can
  then appear twice, never zero times. `block` has no such window.

Metrics (`/metrics/`): `stockstream_archive_{objects,records,bytes}_total`,
`stockstream_archive_skipped_total{reason}`, `stockstream_archive_failures_total{operation}`,
`stockstream_archive_retries_total`, `stockstream_archive_last_success_timestamp_seconds`,
`stockstream_archive_blocked`, `stockstream_archive_flush_seconds`, and
`stockstream_dead_letters_total{reason="archive-failed"}`. Logs carry partition, offsets and key.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from stockstream.archive.manifest import Manifest, load_manifest, manifest_key
from stockstream.archive.object_store import ObjectStore
from stockstream.archive.object_store import from_settings as object_store
from stockstream.archive.writer import BatchWriter, Revoked, StorageCalls
from stockstream.contracts.quotes import QuoteValidator
from stockstream.deadletter import DeadLetters
from stockstream.kafka.consumer_service import ConsumerService
from stockstream.metrics import ARCHIVE_FAILURES, ARCHIVE_FLUSH, ARCHIVE_SKIPPED
from stockstream.retry import GaveUp
from stockstream.settings import Settings

log = logging.getLogger(__name__)


def _offset(record: Any) -> int:
    return int(record.offset)


def _size(record: Any) -> int:
    """What a record counts towards ARCHIVE_BATCH_BYTES: key + value."""
    return len(record.key or b"") + len(record.value or b"")


@dataclass
class _Partition:
    tp: TopicPartition
    ready: bool = False  # manifest loaded and position set
    through: int = -1  # handled (archived or dead-lettered) through this offset
    forced_last: int | None = None  # a crashed batch's intent: cut the next batch exactly here
    records: list[Any] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0  # monotonic time of the first buffered record
    ready_at: float = 0.0


class Archiver(ConsumerService):
    """Consumes `stock-quotes` with its own consumer group and archives it (module doc)."""

    name = "archive"

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        dead_letters: DeadLetters,
        group_id: str | None = None,
    ) -> None:
        super().__init__(
            settings,
            settings.kafka.quotes_topic,
            group_id or f"{settings.worker.app_id}-archive",
            # Revocation waits for an in-flight storage call (bounded by the client timeouts).
            rebalance_timeout_ms=60_000,
        )
        self.conf = settings.archive
        self.store = store
        self._parts: dict[int, _Partition] = {}
        self.calls = StorageCalls(self.conf, store, self.wait_paused)
        self.writer = BatchWriter(
            self.topic,
            self.conf,
            self.calls,
            QuoteValidator.from_settings(settings.quotes),
            int(settings.quotes.max_future_seconds * 1000),
            dead_letters,
        )

    def describe(self) -> dict[str, Any]:
        return {"store": self.store.describe(), "policy": self.conf.failure_policy}

    async def consume(self) -> None:
        consumer = self.consumer
        while True:
            await self._init_partitions()
            batches = await consumer.getmany(timeout_ms=self._poll_timeout_ms())
            for tp, records in batches.items():
                part = self._parts.get(tp.partition)
                if part is None or not part.ready:
                    continue  # not ours (anymore) or re-seeked at init: read again later
                await self._add(part, records)
            await self._flush_due()

    async def on_stop(self) -> None:
        self._parts.clear()

    def resumable(self) -> list[TopicPartition]:
        return [p.tp for p in self._parts.values() if p.ready]

    async def on_assigned(self, assigned: Collection[TopicPartition]) -> None:
        for tp in assigned:
            if tp.partition not in self._parts:
                self._parts[tp.partition] = _Partition(tp)
        # Nothing is read before the partition's manifest is loaded and its position set.
        pending = [tp for tp in assigned if not self._parts[tp.partition].ready]
        if pending:
            self.consumer.pause(*pending)

    async def on_revoked(self, revoked: Collection[TopicPartition]) -> None:
        for tp in revoked:
            part = self._parts.pop(tp.partition, None)
            if part is not None and part.records:
                log.info(
                    "archive partition revoked, unwritten batch left to the new owner",
                    extra={
                        "partition": tp.partition,
                        "first_offset": part.records[0].offset,
                        "records": len(part.records),
                    },
                )
        # A storage call already running for a revoked partition finishes before the new
        # owner can read the manifest; flushes check ownership before every further call.
        await self.calls.idle()

    def _owned(self, part: _Partition) -> bool:
        return self._parts.get(part.tp.partition) is part

    # -- partition start: manifest and position -----------------------------------------

    async def _init_partitions(self) -> None:
        for part in list(self._parts.values()):
            if not part.ready and self._owned(part):
                await self._init_partition(part)

    async def _init_partition(self, part: _Partition) -> None:
        partition = part.tp.partition
        key = manifest_key(self.topic, partition)

        def owned() -> bool:
            return self._owned(part)

        try:
            data = await self.calls.call("get-manifest", partition, owned, self.store.get, key)
            manifest = load_manifest(data, key) if data else None
        except GaveUp:
            log.error(
                "archive manifest unreadable, starting from the committed offset",
                extra={"partition": partition, "key": key},
            )
            manifest = None
        except Revoked:
            return
        try:
            committed = await self.calls.call(
                "committed-offset",
                partition,
                owned,
                self.consumer.committed,
                part.tp,
                to_thread=False,
                forever=True,
            )
        except Revoked:
            return
        start = self._start_offset(part, manifest, committed)
        if start is None:
            # No manifest, no commit: the reset policy decides. Resolved to an offset here:
            # seek_to_beginning/end would race with the consumer's own pending reset.
            if self.settings.worker.consumer_auto_offset_reset == "earliest":
                ends = await self.consumer.beginning_offsets([part.tp])
            else:
                ends = await self.consumer.end_offsets([part.tp])
            start = int(ends[part.tp])
        if not self._owned(part):
            return
        # Always an explicit seek: records prefetched from elsewhere are discarded.
        self.consumer.seek(part.tp, start)
        part.ready = True
        part.ready_at = time.monotonic()
        self.consumer.resume(part.tp)
        log.info(
            "archive partition ready",
            extra={
                "partition": partition,
                "offset": start,
                "through": part.through,
                "forced_last": part.forced_last,
            },
        )

    @staticmethod
    def _start_offset(
        part: _Partition, manifest: Manifest | None, committed: int | None
    ) -> int | None:
        """max(through + 1, committed offset); remembers an interrupted batch's boundary."""
        start: int | None = None
        if manifest is not None:
            start = manifest.through + 1
            part.through = manifest.through
        if committed is not None and committed >= 0:
            start = committed if start is None else max(start, committed)
            part.through = max(part.through, committed - 1)
        if manifest is not None and manifest.pending is not None and start is not None:
            first, last = manifest.pending
            if first >= start:
                part.forced_last = last
                log.warning(
                    "archive found an interrupted batch, re-writing it with the same boundaries",
                    extra={
                        "partition": part.tp.partition,
                        "first_offset": first,
                        "last_offset": last,
                        "keys": list(manifest.keys),
                    },
                )
        return start

    # -- batching -----------------------------------------------------------------------

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        wait = 1.0
        for part in self._parts.values():
            if part.records:
                wait = min(wait, part.started + self.conf.batch_seconds - now)
        return int(max(0.02, wait) * 1000)

    async def _add(self, part: _Partition, records: list[Any]) -> None:
        """Append one fetch of the partition's records (ascending offsets) to its batch,
        flushing at every batch boundary: a fetch at a time, not a coroutine per record, as
        this runs on the event loop the aggregation shares."""
        first = 0
        while first < len(records) and records[first].offset <= part.through:
            first += 1
        if first:
            ARCHIVE_SKIPPED.labels("archived").inc(first)
        rest = records[first:]
        while rest:
            forced = part.forced_last
            if forced is not None:
                # A crashed batch's boundary: the next batch is exactly the offsets up to it.
                upto = bisect.bisect_right(rest, forced, key=_offset)
                if upto == 0:
                    if part.records:
                        await self._flush(part)
                        if not self._owned(part):
                            return
                    part.forced_last = None
                    continue
                chunk, rest = rest[:upto], rest[upto:]
                self._append(part, chunk, part.nbytes + sum(map(_size, chunk)))
                if part.records[-1].offset >= forced:
                    await self._flush(part)
                    if not self._owned(part):
                        return  # revoked during the flush: the new owner re-reads the rest
                continue
            room = max(1, self.conf.batch_records - len(part.records))
            take, full = min(room, len(rest)), room <= len(rest)
            nbytes = part.nbytes
            for i, size in enumerate(map(_size, rest[:take])):
                nbytes += size
                if nbytes >= self.conf.batch_bytes:
                    take, full = i + 1, True
                    break
            chunk, rest = rest[:take], rest[take:]
            self._append(part, chunk, nbytes)
            if full:
                await self._flush(part)
                if not self._owned(part):
                    return

    @staticmethod
    def _append(part: _Partition, records: list[Any], nbytes: int) -> None:
        if not part.records:
            part.started = time.monotonic()
        part.records.extend(records)
        part.nbytes = nbytes

    async def _flush_due(self) -> None:
        now = time.monotonic()
        for part in list(self._parts.values()):
            if not part.ready or not self._owned(part):
                continue
            aged = part.records and now - part.started >= self.conf.batch_seconds
            if part.forced_last is not None:
                # The interrupted batch may end in an offset gap (e.g. a transaction marker):
                # once the consumer is past it, what we have is the whole batch.
                idle = now - part.ready_at >= self.conf.batch_seconds
                if (aged or (idle and not part.records)) and await self._past(part):
                    if part.records:
                        await self._flush(part)
                    else:
                        part.forced_last = None
            elif aged:
                await self._flush(part)

    async def _past(self, part: _Partition) -> bool:
        try:
            position = await self.consumer.position(part.tp)
        except Exception:
            return False
        return part.forced_last is not None and int(position) > part.forced_last

    async def _flush(self, part: _Partition) -> None:
        records, forced = part.records, part.forced_last is not None
        part.records, part.nbytes, part.forced_last = [], 0, None
        started = time.perf_counter()
        last = records[-1].offset
        try:
            await self.writer.write(
                part.tp.partition, part.through, records, forced, lambda: self._owned(part)
            )
        except Revoked:
            log.info(
                "archive partition revoked while writing, batch left to the new owner",
                extra={"partition": part.tp.partition, "first_offset": records[0].offset},
            )
            return
        part.through = last
        # A failed commit only means re-reading records at or below `through`, which are skipped.
        if self._owned(part) and not await self.commit({part.tp: last + 1}):
            ARCHIVE_FAILURES.labels("commit").inc()
        ARCHIVE_FLUSH.observe(time.perf_counter() - started)


def archiver(settings: Settings, dead_letters: DeadLetters) -> Archiver:
    """The worker's archive on the configured object store (in or beside it: ARCHIVE_PROCESS)."""
    return Archiver(settings, object_store(settings.archive), dead_letters)
