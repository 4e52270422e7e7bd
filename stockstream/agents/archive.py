"""The raw archive (bronze layer): every valid record of `stock-quotes` into object storage,
in batched Parquet objects, once each, also across crashes and storage outages.

Where it runs, and why not as a Faust agent
-------------------------------------------
It runs inside the Faust worker as a service (started after table recovery, stopped with the
worker) with its OWN Kafka consumer (group `<app id>-archive`), not as a second `@app.agent` on
`stock-quotes`. Faust gives every agent on a topic the same consumer: the conductor puts each
message into every subscribed agent's buffer and commits an offset only when all of them have
acked it. An archive that waits for storage (the `block` policy) therefore stops the aggregation
too. Measured with faust-streaming 0.15.3, two agents on one topic, the archive agent using
`take_events(100, within=1)` and then blocking: the other agent stalls at 4197 of 50000 records
(its 4096-record stream buffer plus the archive's batch) for as long as the archive blocks, and
SIGTERM does not stop the worker (Faust's `wait_empty` waits for the unacked events; still
waiting 11 minutes later); without the block, both agents read all 50000. With its own consumer
the archive has its own position and commits, its back-pressure pauses only its own fetches,
and the aggregation keeps going during an outage (tests/integration/test_archive.py checks it).
`take_events` could not express the byte limit either.

Batches
-------
Per partition, records are buffered until ARCHIVE_BATCH_RECORDS records or
ARCHIVE_BATCH_BYTES bytes (key + value) are reached or the first one is ARCHIVE_BATCH_SECONDS
old. A batch is a contiguous offset range of one partition; it becomes one Parquet object per
UTC (date, hour) of `market_timestamp` (sinks/parquet.py has the layout and schema). Parsing,
validation and encoding run in a thread, like the storage calls, so the event loop the
aggregation shares is not held up.

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
`_progress/<topic>/partition-<p>.json`, in the same store:

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
  `stockstream dlq replay` (stockstream/dlq_replay.py) writes them into the archive once
  storage is back. Under this policy a manifest that cannot be read when a partition is
  assigned is treated as absent, so a batch a crash left half-written may be re-cut: rows can
  then appear twice, never zero times. `block` has no such window.

Metrics (`/metrics/`): `stockstream_archive_{objects,records,bytes}_total`,
`stockstream_archive_skipped_total{reason}`, `stockstream_archive_failures_total{operation}`,
`stockstream_archive_retries_total`, `stockstream_archive_last_success_timestamp_seconds`,
`stockstream_archive_blocked`, `stockstream_archive_flush_seconds`, and
`stockstream_dead_letters_total{reason="archive-failed"}`. Logs carry partition, offsets and key.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service
from prometheus_client import Counter, Gauge, Histogram

from stockstream.agents.backoff import sleep_polling_paused
from stockstream.application import app, dlq_topic, settings
from stockstream.contracts import QuoteValidator, Reason, dead_letter, iso_utc
from stockstream.metrics import DEAD_LETTERS, REGISTRY
from stockstream.settings import Settings
from stockstream.sinks import parquet
from stockstream.sinks.object_store import ObjectStore, from_settings
from stockstream.topics import bootstrap_list

log = logging.getLogger(__name__)
T = TypeVar("T")

ARCHIVE_OBJECTS = Counter(
    "stockstream_archive_objects_total", "Parquet objects written to the archive", registry=REGISTRY
)
ARCHIVE_RECORDS = Counter(
    "stockstream_archive_records_total", "Quotes written to the archive", registry=REGISTRY
)
ARCHIVE_BYTES = Counter(
    "stockstream_archive_bytes_total", "Parquet bytes written to the archive", registry=REGISTRY
)
ARCHIVE_SKIPPED = Counter(
    "stockstream_archive_skipped_total",
    "Records of stock-quotes not archived, by reason (malformed, invalid: dead-lettered by the"
    " aggregation; archived: re-read at or below the partition's manifest)",
    ["reason"],
    registry=REGISTRY,
)
ARCHIVE_FAILURES = Counter(
    "stockstream_archive_failures_total",
    "Failed attempts, by operation (put-object, put-manifest, get-manifest, dead-letter, ...)",
    ["operation"],
    registry=REGISTRY,
)
ARCHIVE_RETRIES = Counter(
    "stockstream_archive_retries_total", "Retries after a failed attempt", registry=REGISTRY
)
ARCHIVE_LAST_SUCCESS = Gauge(
    "stockstream_archive_last_success_timestamp_seconds",
    "Unix time of the last batch stored",
    registry=REGISTRY,
)
ARCHIVE_BLOCKED = Gauge(
    "stockstream_archive_blocked",
    "1 while storage keeps failing beyond ARCHIVE_MAX_RETRIES under the block policy",
    registry=REGISTRY,
)
ARCHIVE_FLUSH = Histogram(
    "stockstream_archive_flush_seconds",
    "Time to encode and store one batch (retries included)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)

SendDeadLetter = Callable[[bytes | None, bytes], Awaitable[Awaitable[Any]]]


def manifest_key(topic: str, partition: int) -> str:
    return f"_progress/{topic}/partition-{partition}.json"


@dataclass(frozen=True)
class Manifest:
    """Per-partition progress: handled through `through`; `pending` = batch being written."""

    through: int = -1
    pending: tuple[int, int] | None = None
    keys: tuple[str, ...] = ()

    def dumps(self, topic: str, partition: int) -> bytes:
        pending = None
        if self.pending is not None:
            pending = {"first": self.pending[0], "last": self.pending[1], "keys": list(self.keys)}
        return orjson.dumps(
            {
                "topic": topic,
                "partition": partition,
                "through": self.through,
                "pending": pending,
                "updated_at": iso_utc(int(time.time() * 1000)),
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def loads(cls, data: bytes) -> Manifest:
        body = orjson.loads(data)
        pending = body.get("pending")
        if pending:
            return cls(
                int(body["through"]),
                (int(pending["first"]), int(pending["last"])),
                tuple(pending.get("keys", ())),
            )
        return cls(int(body["through"]))


def _load_manifest(data: bytes, key: str) -> Manifest | None:
    try:
        return Manifest.loads(data)
    except (ValueError, KeyError, TypeError) as exc:
        # Writes are atomic, so only a hand-edited object gets here: trust the Kafka commit.
        log.error("archive manifest unreadable, ignored", extra={"key": key, "error": repr(exc)})
        return None


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


class _Revoked(Exception):
    """The partition was revoked while its batch was being written."""


class _GaveUp(Exception):
    """Retries exhausted under the dead-letter policy."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, archiver: Archiver) -> None:
        self.archiver = archiver

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.archiver.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.archiver.on_assigned(assigned)


@dataclass
class _Encoded:
    key: str
    data: bytes
    offsets: list[int]


class Archiver:
    """Consumes `stock-quotes` with its own consumer group and archives it (see module doc)."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        send_dead_letter: SendDeadLetter,
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.conf = settings.archive
        self.store = store
        self.topic = settings.kafka.quotes_topic
        self.group_id = group_id or f"{settings.worker.app_id}-archive"
        self._send_dead_letter = send_dead_letter
        agg = settings.aggregation
        self.validator = QuoteValidator(agg.symbol_pattern, int(agg.max_future_seconds * 1000))
        self._parts: dict[int, _Partition] = {}
        self._consumer: Any = None
        self._io = asyncio.Lock()  # one storage call at a time; revocation waits for it
        self._store_ready = False

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
            # Revocation waits for an in-flight storage call (bounded by the client timeouts).
            rebalance_timeout_ms=60_000,
        )

    async def run(self) -> None:
        """Consume and archive until cancelled."""
        consumer = self._consumer = self._new_consumer()
        consumer.subscribe([self.topic], listener=_Listener(self))
        await consumer.start()
        log.info(
            "archive started",
            extra={
                "topic": self.topic,
                "group": self.group_id,
                "store": self.store.describe(),
                "policy": self.conf.failure_policy,
            },
        )
        try:
            while True:
                await self._init_partitions()
                batches = await consumer.getmany(timeout_ms=self._poll_timeout_ms())
                for tp, records in batches.items():
                    part = self._parts.get(tp.partition)
                    if part is None or not part.ready:
                        continue  # not ours (anymore) or re-seeked at init: read again later
                    for record in records:
                        await self._add(part, record)
                        if self._parts.get(tp.partition) is not part:
                            break  # revoked during a flush: the new owner re-reads the rest
                await self._flush_due()
        finally:
            self._parts.clear()
            await consumer.stop()

    def on_assigned(self, assigned: Any) -> None:
        mine = [tp for tp in assigned if tp.topic == self.topic]
        for tp in mine:
            if tp.partition not in self._parts:
                self._parts[tp.partition] = _Partition(tp)
        # Nothing is read before the partition's manifest is loaded and its position set.
        pending = [tp for tp in mine if not self._parts[tp.partition].ready]
        if pending:
            self._consumer.pause(*pending)
        log.info(
            "archive partitions assigned", extra={"partitions": sorted(tp.partition for tp in mine)}
        )

    async def on_revoked(self, revoked: Any) -> None:
        gone = sorted(tp.partition for tp in revoked if tp.topic == self.topic)
        for partition in gone:
            part = self._parts.pop(partition, None)
            if part is not None and part.records:
                log.info(
                    "archive partition revoked, unwritten batch left to the new owner",
                    extra={
                        "partition": partition,
                        "first_offset": part.records[0].offset,
                        "records": len(part.records),
                    },
                )
        # A storage call already running for a revoked partition finishes before the new
        # owner can read the manifest; flushes check ownership before every further call.
        async with self._io:
            pass

    def _owned(self, part: _Partition) -> bool:
        return self._parts.get(part.tp.partition) is part

    # -- partition start: manifest and position -----------------------------------------

    async def _init_partitions(self) -> None:
        for part in list(self._parts.values()):
            if not part.ready and self._owned(part):
                await self._init_partition(part)

    async def _init_partition(self, part: _Partition) -> None:
        key = manifest_key(self.topic, part.tp.partition)
        try:
            data = await self._retry("get-manifest", part, self.store.get, key)
            manifest = _load_manifest(data, key) if data else None
        except _GaveUp:
            log.error(
                "archive manifest unreadable, starting from the committed offset",
                extra={"partition": part.tp.partition, "key": key},
            )
            manifest = None
        except _Revoked:
            return
        try:
            committed = await self._retry(
                "committed-offset",
                part,
                self._consumer.committed,
                part.tp,
                to_thread=False,
                forever=True,
            )
        except _Revoked:
            return
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
        if start is None:
            # No manifest, no commit: the reset policy decides. Resolved to an offset here:
            # seek_to_beginning/end would race with the consumer's own pending reset.
            if self.settings.worker.consumer_auto_offset_reset == "earliest":
                ends = await self._consumer.beginning_offsets([part.tp])
            else:
                ends = await self._consumer.end_offsets([part.tp])
            start = int(ends[part.tp])
        if not self._owned(part):
            return
        # Always an explicit seek: records prefetched from elsewhere are discarded.
        self._consumer.seek(part.tp, start)
        part.ready = True
        part.ready_at = time.monotonic()
        self._consumer.resume(part.tp)
        log.info(
            "archive partition ready",
            extra={
                "partition": part.tp.partition,
                "offset": start,
                "through": part.through,
                "forced_last": part.forced_last,
            },
        )

    # -- batching -----------------------------------------------------------------------

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        wait = 1.0
        for part in self._parts.values():
            if part.records:
                wait = min(wait, part.started + self.conf.batch_seconds - now)
        return int(max(0.02, wait) * 1000)

    async def _add(self, part: _Partition, record: Any) -> None:
        if record.offset <= part.through:
            ARCHIVE_SKIPPED.labels("archived").inc()
            return
        forced = part.forced_last
        if forced is not None and record.offset > forced:
            if part.records:
                await self._flush(part)
                if not self._owned(part):
                    return
            part.forced_last = forced = None
        if not part.records:
            part.started = time.monotonic()
        part.records.append(record)
        part.nbytes += len(record.key or b"") + len(record.value or b"")
        if forced is not None:
            if record.offset >= forced:
                await self._flush(part)
        elif len(part.records) >= self.conf.batch_records or part.nbytes >= self.conf.batch_bytes:
            await self._flush(part)

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
            position = await self._consumer.position(part.tp)
        except Exception:
            return False
        return part.forced_last is not None and int(position) > part.forced_last

    # -- writing a batch ----------------------------------------------------------------

    def _encode(self, partition: int, records: Sequence[Any]) -> tuple[list[_Encoded], list[Any]]:
        rows, rejected = parquet.parse_records(records, self.validator)
        encoded = [
            _Encoded(key, parquet.encode(group), [r.offset for r in group])
            for key, group in parquet.split_by_hour(self.topic, rows)
        ]
        return encoded, rejected

    async def _flush(self, part: _Partition) -> None:
        records, forced = part.records, part.forced_last is not None
        part.records, part.nbytes, part.forced_last = [], 0, None
        started = time.perf_counter()
        try:
            await self._write_batch(part, records, forced)
        except _Revoked:
            log.info(
                "archive partition revoked while writing, batch left to the new owner",
                extra={"partition": part.tp.partition, "first_offset": records[0].offset},
            )
            return
        ARCHIVE_FLUSH.observe(time.perf_counter() - started)

    async def _write_batch(self, part: _Partition, records: list[Any], forced: bool) -> None:
        partition = part.tp.partition
        first, last = records[0].offset, records[-1].offset
        encoded, rejected = await asyncio.to_thread(self._encode, partition, records)
        for _, exc in rejected:
            ARCHIVE_SKIPPED.labels(exc.reason.value).inc()
        failed: list[_Encoded] = []
        error = ""
        if encoded:
            mkey = manifest_key(self.topic, partition)
            keys = tuple(e.key for e in encoded)
            storage_down = False
            if not forced:
                intent = Manifest(part.through, (first, last), keys)
                try:
                    await self._retry(
                        "put-manifest",
                        part,
                        self._put_json,
                        mkey,
                        intent.dumps(self.topic, partition),
                    )
                except _GaveUp as exc:
                    storage_down, error = True, str(exc)
            for item in encoded:
                if storage_down:  # do not wait out the retries again for every object
                    failed.append(item)
                    continue
                try:
                    await self._retry(
                        "put-object",
                        part,
                        self.store.put,
                        item.key,
                        item.data,
                        parquet.CONTENT_TYPE,
                    )
                except _GaveUp as exc:
                    storage_down, error = True, str(exc)
                    failed.append(item)
                    continue
                ARCHIVE_OBJECTS.inc()
                ARCHIVE_RECORDS.inc(len(item.offsets))
                ARCHIVE_BYTES.inc(len(item.data))
                log.info(
                    "archived object",
                    extra={
                        "partition": partition,
                        "first_offset": item.offsets[0],
                        "last_offset": item.offsets[-1],
                        "key": item.key,
                        "records": len(item.offsets),
                        "bytes": len(item.data),
                    },
                )
            if failed:
                await self._dead_letter(part, records, failed, error)
            if len(failed) < len(encoded):
                # Not needed for correctness when it fails (the commit below moves the start
                # past this batch), so a give-up here is only logged.
                done = Manifest(last)
                try:
                    await self._retry(
                        "put-manifest",
                        part,
                        self._put_json,
                        mkey,
                        done.dumps(self.topic, partition),
                    )
                except _GaveUp:
                    log.error(
                        "archive manifest not updated",
                        extra={"partition": partition, "through": last},
                    )
        part.through = last
        await self._commit(part, last + 1)
        if encoded and not failed:
            ARCHIVE_LAST_SUCCESS.set(time.time())

    def _put_json(self, key: str, data: bytes) -> None:
        self.store.put(key, data, "application/json")

    async def _commit(self, part: _Partition, offset: int) -> None:
        if not self._owned(part):
            return
        try:
            await self._consumer.commit({part.tp: offset})
        except (KafkaError, AssertionError) as exc:
            # The manifest already records the progress; the commit only saves re-reading.
            ARCHIVE_FAILURES.labels("commit").inc()
            log.warning(
                "archive offset commit failed",
                extra={"partition": part.tp.partition, "offset": offset, "error": repr(exc)},
            )

    async def _dead_letter(
        self, part: _Partition, records: list[Any], failed: list[_Encoded], error: str
    ) -> None:
        offsets = {o for item in failed for o in item.offsets}
        chosen = [r for r in records if r.offset in offsets]
        now_ms = int(time.time() * 1000)
        message = f"archive write failed after {self.conf.max_retries} retries: {error}"

        async def send_all() -> None:
            futures = []
            for r in chosen:
                body = dead_letter(
                    key=r.key,
                    value=r.value,
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    reason=Reason.ARCHIVE_FAILED,
                    error=message,
                    failed_at_ms=now_ms,
                )
                futures.append(await self._send_dead_letter(r.key, orjson.dumps(body)))
            await asyncio.gather(*futures)

        # The DLQ is Kafka, not the failing storage: keep trying until it has the records,
        # since the offsets are committed right after.
        await self._retry("dead-letter", part, send_all, to_thread=False, forever=True)
        DEAD_LETTERS.labels(Reason.ARCHIVE_FAILED.value).inc(len(chosen))
        for item in failed:
            log.warning(
                "archive dead-lettered records",
                extra={
                    "partition": part.tp.partition,
                    "first_offset": item.offsets[0],
                    "last_offset": item.offsets[-1],
                    "key": item.key,
                    "records": len(item.offsets),
                    "reason": Reason.ARCHIVE_FAILED.value,
                    "error": error,
                },
            )

    # -- retries ------------------------------------------------------------------------

    async def _retry(
        self,
        operation: str,
        part: _Partition,
        fn: Callable[..., Any],
        *args: Any,
        to_thread: bool = True,
        forever: bool = False,
    ) -> Any:
        """Run `fn` until it succeeds. Back-off doubles from ARCHIVE_BACKOFF_INITIAL_SECONDS up
        to ARCHIVE_BACKOFF_MAX_SECONDS, with jitter; after ARCHIVE_MAX_RETRIES retries the
        policy decides: `block` goes on, `dead-letter` raises _GaveUp. Raises _Revoked once the
        partition is no longer ours."""
        conf = self.conf
        delay = conf.backoff_initial_seconds
        attempt = 0
        try:
            while True:
                if not self._owned(part):
                    raise _Revoked()
                try:
                    if to_thread:
                        async with self._io:
                            if not self._store_ready:
                                await asyncio.to_thread(self.store.ensure_ready)
                                self._store_ready = True
                            return await asyncio.to_thread(fn, *args)
                    result = fn(*args)
                    return await result if asyncio.iscoroutine(result) else result
                except (asyncio.CancelledError, _Revoked):
                    raise
                except Exception as exc:
                    ARCHIVE_FAILURES.labels(operation).inc()
                    attempt += 1
                    gave_up = attempt > conf.max_retries
                    if gave_up and conf.failure_policy == "dead-letter" and not forever:
                        raise _GaveUp(f"{operation}: {exc!r}") from exc
                    if gave_up and to_thread:
                        ARCHIVE_BLOCKED.set(1)
                    ARCHIVE_RETRIES.inc()
                    # "Equal jitter": half the delay fixed, half random, so retries of several
                    # workers spread out but never collapse to zero.
                    pause = delay / 2 + random.uniform(0, delay / 2)
                    log.warning(
                        "archive storage call failed, retrying",
                        extra={
                            "operation": operation,
                            "partition": part.tp.partition,
                            "attempt": attempt,
                            "retry_in_s": round(pause, 3),
                            "store": self.store.describe() if to_thread else "kafka",
                            "error": repr(exc),
                        },
                    )
                    await self._backoff(pause)
                    delay = min(delay * 2, conf.backoff_max_seconds)
        finally:
            if attempt:
                ARCHIVE_BLOCKED.set(0)

    async def _backoff(self, seconds: float) -> None:
        await sleep_polling_paused(
            self._consumer,
            seconds,
            lambda: [p.tp for p in self._parts.values() if p.ready],
        )


class ArchiveService(Service):
    """Runs the Archiver for the worker's lifetime; restarts it after an unexpected error."""

    async def on_start(self) -> None:
        self.archiver = Archiver(settings, from_settings(settings.archive), self._send)

    @staticmethod
    async def _send(key: bytes | None, value: bytes) -> Awaitable[Any]:
        fut: Awaitable[Any] = await dlq_topic.send(key=key, value=value)
        return fut

    @Service.task
    async def _supervise(self) -> None:
        while not self.should_stop:
            try:
                await self.archiver.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("archive crashed, restarting in 5 s")
                await self.sleep(5.0)


if settings.archive.enabled:
    app.service(ArchiveService)
