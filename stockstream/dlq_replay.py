"""`stockstream dlq replay`: re-drive dead-lettered records once their cause is fixed.

Reads `stock-quotes-dlq` from the replay's consumer-group position up to the end offsets seen at
start (so a run terminates), keeps the records whose reason was asked for (default
`archive-failed`; `reasons=None` = any) and re-drives each according to what failed:

- `archive-failed` -> written into the archive itself, under the ORIGINAL partition and offset
  (`<topic>/date=/hour=/replay-<partition>-<first>-<last>.parquet`). They are deliberately not
  produced to `stock-quotes` again: the aggregation already folded those records (only the
  archive failed), so a second copy at a new offset would be counted twice in a still-open
  window or dead-lettered as `late` by a closed one, and the archive would hold the quote
  under two offsets. Written this way the archive ends up with each original (partition,
  offset) exactly once, as if storage had never failed.
- any other reason (`malformed`, `invalid`, `late`, `warehouse-rejected`, ...) -> the original
  key and value are produced again to their original topic, e.g. after a validator fix. They
  are new records there (new offsets) for every consumer; a cause that is not fixed (a `late`
  quote whose window is closed, a still-invalid record) dead-letters them again.

Idempotence, so a re-run or a crash mid-run never re-drives twice:

- Progress is the commit of one consumer group per reason, `<app id>-dlq-replay-<reason>`, on
  the DLQ: a run resumes where the last one for that reason stopped, and replaying
  `archive-failed` does not mark the `invalid` records as done (or the other way round).
- Re-produced records and that commit are one Kafka transaction
  (`send_offsets_to_transaction`): either both happen or neither (read_committed consumers,
  such as the archive, never see an aborted copy).
- Re-archived records are first checked against the archive: a record (p, o) of event hour H is
  already there if an object `part-p-f-l` of that hour has f <= o <= l (archive batches are
  contiguous offset ranges, see sinks/parquet.py) or a `replay-p-*` object of that hour contains
  it. So a crash between writing and committing, a DLQ record present twice (the DLQ is
  at-least-once) or a PUT the archive counted as failed although the server stored it do not
  produce a second copy. The objects are written before the commit.

Objects written by a replay have no `kafka_timestamp` (the DLQ does not carry it); everything else
is identical to what the archive would have written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Collection
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stockstream.contracts import ContractError, QuoteValidator, Reason, original_bytes
from stockstream.settings import Settings
from stockstream.sinks import parquet
from stockstream.sinks.object_store import ObjectStore, from_settings
from stockstream.sinks.parquet import ArchiveRow
from stockstream.topics import bootstrap_list

log = logging.getLogger(__name__)

DEFAULT_REASONS = (Reason.ARCHIVE_FAILED.value,)
_FIELDS = frozenset(
    ("key", "key_base64", "value", "value_base64", "topic", "partition", "offset", "reason")
)


class ReplayError(RuntimeError):
    pass


async def replay_dead_letters(
    settings: Settings,
    reasons: Collection[str] | None = DEFAULT_REASONS,
    *,
    store: ObjectStore | None = None,
    group_prefix: str | None = None,
    chunk_records: int = 5000,
) -> int:
    """Re-drive the DLQ records with one of `reasons` (None = every `Reason`); returns how many
    were re-driven (re-archived + re-produced). Records already archived are skipped, not
    counted. Each reason has its own consumer group (`<prefix>-<reason>`), so replaying one
    reason never marks records of another as done."""
    chosen = [r.value for r in Reason] if reasons is None else list(dict.fromkeys(reasons))
    unknown = set(chosen) - {r.value for r in Reason}
    if unknown:
        raise ReplayError(f"unknown reason(s): {', '.join(sorted(unknown))}")
    prefix = group_prefix or f"{settings.worker.app_id}-dlq-replay"
    archive_store = store or from_settings(settings.archive)
    agg = settings.aggregation
    validator = QuoteValidator(agg.symbol_pattern, int(agg.max_future_seconds * 1000))
    total = 0
    for reason in chosen:
        total += await _replay_reason(
            settings, reason, f"{prefix}-{reason}", archive_store, validator, chunk_records
        )
    return total


async def _replay_reason(
    settings: Settings,
    reason: str,
    group: str,
    store: ObjectStore,
    validator: QuoteValidator,
    chunk_records: int,
) -> int:
    """One pass over the DLQ for one reason, from its group's position to today's end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_list(settings),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer: Any = None
    await consumer.start()
    try:
        dlq = settings.kafka.dlq_topic
        tps = await _assign(consumer, dlq, await _partitions(settings, dlq))
        end = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if await consumer.position(tp) < end[tp]}
        total = 0
        while remaining:
            records: list[Any] = []
            while remaining and len(records) < chunk_records:
                fetched = await consumer.getmany(
                    *remaining, timeout_ms=1000, max_records=chunk_records - len(records)
                )
                for tp, batch in fetched.items():
                    records.extend(r for r in batch if r.offset < end[tp])
                for tp in list(remaining):
                    if await consumer.position(tp) >= end[tp]:
                        remaining.discard(tp)
            offsets: dict[TopicPartition, int] = {}
            for r in records:
                tp = TopicPartition(r.topic, r.partition)
                offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
            selected = _select(records, reason)
            archived = 0
            if reason == Reason.ARCHIVE_FAILED.value:
                if selected:
                    archived = await _with_retries(
                        settings, "re-archive", _rearchive, store, validator, selected
                    )
                if offsets:
                    await consumer.commit(offsets)
            elif selected:
                if producer is None:
                    producer = AIOKafkaProducer(
                        bootstrap_servers=bootstrap_list(settings),
                        transactional_id=group,
                        enable_idempotence=True,
                        acks="all",
                    )
                    await producer.start()
                async with producer.transaction():
                    for body in selected:
                        key, value = original_bytes(body)
                        await producer.send(body["topic"], key=key, value=value)
                    await producer.send_offsets_to_transaction(offsets, group)
            elif offsets:
                await consumer.commit(offsets)
            redriven = archived if reason == Reason.ARCHIVE_FAILED.value else len(selected)
            total += redriven
            log.info(
                "dead letters re-driven",
                extra={
                    "reason": reason,
                    "read": len(records),
                    "selected": len(selected),
                    "re_driven": redriven,
                },
            )
        return total
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()


async def _partitions(settings: Settings, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_list(settings))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for d in described if d["topic"] == topic for p in d["partitions"]]
    if not partitions:
        raise ReplayError(f"topic {topic!r} not found")
    return partitions


async def _assign(consumer: Any, topic: str, partitions: list[int]) -> list[TopicPartition]:
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    beginning = await consumer.beginning_offsets(tps)
    for tp in tps:
        committed = await consumer.committed(tp)
        # Explicit offsets: seek_to_beginning() races with the consumer's own initial reset.
        consumer.seek(tp, beginning[tp] if committed is None else max(committed, beginning[tp]))
    return tps


def _select(records: list[Any], reason: str) -> list[dict[str, Any]]:
    selected: list[dict[str, Any]] = []
    for r in records:
        try:
            body = orjson.loads(r.value)
            missing = _FIELDS.difference(body)
        except (orjson.JSONDecodeError, TypeError):
            missing = _FIELDS
        if missing:
            log.warning(
                "not a dead-letter record, skipped",
                extra={"partition": r.partition, "offset": r.offset, "missing": sorted(missing)},
            )
            continue
        if body["reason"] == reason:
            selected.append(body)
    return selected


def _rearchive(store: ObjectStore, validator: QuoteValidator, bodies: list[dict[str, Any]]) -> int:
    """Write the dead-lettered quotes that are not in the archive yet; returns how many."""
    now_ms = int(time.time() * 1000)
    rows: dict[tuple[str, int, int], ArchiveRow] = {}
    for body in bodies:
        raw_key, raw_value = original_bytes(body)
        try:
            quote = validator.parse(raw_key, raw_value, now_ms)
        except ContractError as exc:
            log.warning(
                "dead-lettered record is not a valid quote, not archived",
                extra={
                    "partition": body["partition"],
                    "offset": body["offset"],
                    "error": exc.error,
                },
            )
            continue
        coordinates = (body["topic"], int(body["partition"]), int(body["offset"]))
        rows[coordinates] = ArchiveRow(coordinates[1], coordinates[2], None, quote)
    by_hour: dict[tuple[str, str, str], list[tuple[int, int, ArchiveRow]]] = defaultdict(list)
    for (topic, partition, offset), row in rows.items():
        date, hour = parquet.event_hour(row.quote.market_timestamp)
        by_hour[(topic, date, hour)].append((partition, offset, row))
    written = 0
    for (topic, date, hour), members in sorted(by_hour.items()):
        present = _archived(store, f"{topic}/date={date}/hour={hour}/")
        missing: dict[int, list[ArchiveRow]] = defaultdict(list)
        for partition, offset, row in members:
            if not present(partition, offset):
                missing[partition].append(row)
        for _, group in sorted(missing.items()):
            for key, objects_rows in parquet.split_by_hour(topic, group, kind="replay"):
                store.put(key, parquet.encode(objects_rows), parquet.CONTENT_TYPE)
                written += len(objects_rows)
                log.info(
                    "re-archived dead letters",
                    extra={"key": key, "records": len(objects_rows)},
                )
    return written


def _archived(store: ObjectStore, prefix: str) -> Any:
    """A predicate: is (partition, offset) of this (date, hour) directory already archived?"""
    ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
    exact: set[tuple[int, int]] = set()
    for key in store.list(prefix):
        name = parquet.parse_key(key)
        if name is None:
            continue
        if name.kind == "part":
            ranges[name.partition].append((name.first, name.last))
        else:
            data = store.get(key)
            if data is None:
                continue
            table = parquet.read_table(data).select(["kafka_partition", "kafka_offset"])
            exact.update(
                zip(
                    table.column("kafka_partition").to_pylist(),
                    table.column("kafka_offset").to_pylist(),
                    strict=True,
                )
            )

    def present(partition: int, offset: int) -> bool:
        if (partition, offset) in exact:
            return True
        return any(first <= offset <= last for first, last in ranges.get(partition, ()))

    return present


async def _with_retries(settings: Settings, what: str, fn: Any, *args: Any) -> Any:
    conf = settings.archive
    delay = conf.backoff_initial_seconds
    attempts = max(1, conf.max_retries + 1)
    for attempt in range(1, attempts + 1):
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:
            if attempt == attempts:
                raise ReplayError(
                    f"{what} failed after {attempt} attempts: {exc!r}; nothing was committed,"
                    " run the replay again once storage is reachable"
                ) from exc
            log.warning(
                "replay storage call failed, retrying",
                extra={"operation": what, "attempt": attempt, "error": repr(exc)},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, conf.backoff_max_seconds)
    raise AssertionError("unreachable")
