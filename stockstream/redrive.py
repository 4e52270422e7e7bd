"""`stockstream dlq redrive`: send dead-lettered records on once their cause is fixed.

Reads `stock-quotes-dlq` from the re-drive's consumer-group position up to the end offsets seen
at start (so a run terminates), keeps the records whose reason was asked for (default
`archive-failed`; `reasons=None` = any) and re-drives each according to what failed:

- `archive-failed` -> written into the archive itself, under the ORIGINAL partition and offset
  (archive/rearchive.py explains why they are not produced to `stock-quotes` again).
- any other reason (`malformed`, `invalid`, `late`, `warehouse-rejected`, ...) -> the original
  key and value are produced again to their original topic, e.g. after a validator fix. They
  are new records there (new offsets) for every consumer; a cause that is not fixed (a `late`
  quote whose window is closed, a still-invalid record) dead-letters them again.

Idempotence, so a re-run or a crash mid-run never re-drives twice:

- Progress is the commit of one consumer group per reason, `<app id>-dlq-replay-<reason>` (the
  group name predates the word "re-drive" and stays, so existing progress is kept), on the DLQ:
  a run resumes where the last one for that reason stopped, and re-driving `archive-failed`
  does not mark the `invalid` records as done (or the other way round).
- Re-produced records and that commit are one Kafka transaction
  (`send_offsets_to_transaction`): either both happen or neither (read_committed consumers,
  such as the archive, never see an aborted copy).
- Re-archived records are first checked against the archive (archive/rearchive.py), and the
  objects are written before the commit.
- The DLQ itself is at-least-once (a dead letter may be there twice after a crash), so the
  re-drive deduplicates on the original's (topic, partition, offset): re-produced ones are
  recorded in the compacted topic `<app id>-dlq-redriven`, in the same transaction, and never
  re-produced again, in this run or a later one; the archive path checks the archive itself.

Refused, and logged with their coordinates (they stay in the DLQ): dead letters that claim a
topic other than the project's own (`stock-quotes`, `stock-quotes-aggregated`), so that
whoever can write to the DLQ cannot write anywhere through the re-drive (the window-state
changelog, say), and dead letters whose original was cut to fit (`value_truncated`; the
complete original is at its coordinates in its topic).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stockstream.archive.object_store import ObjectStore, from_settings
from stockstream.archive.rearchive import rearchive
from stockstream.contracts.dead_letters import (
    NotADeadLetter,
    Reason,
    is_truncated,
    original_bytes,
    parse_dead_letter,
)
from stockstream.contracts.quotes import QuoteValidator
from stockstream.errors import StockstreamError
from stockstream.kafka import clients
from stockstream.kafka.readback import read_after
from stockstream.kafka.topics import ensure_topics, partitions_of, redriven_topic_name
from stockstream.retry import Backoff, GaveUp, retry
from stockstream.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_REASONS = (Reason.ARCHIVE_FAILED.value,)
# Written back into the archive rather than produced again (archive/rearchive.py says why).
_ARCHIVE_REASONS = frozenset((Reason.ARCHIVE_FAILED.value, Reason.ARCHIVE_REJECTED.value))
Coordinates = tuple[str, int, int]
Selected = tuple[dict[str, Any], Any, Any]


class RedriveError(StockstreamError):
    """The re-drive cannot run or could not finish; nothing uncommitted was lost."""


async def redrive_dead_letters(
    settings: Settings,
    reasons: Collection[str] | None = DEFAULT_REASONS,
    *,
    store: ObjectStore | None = None,
    group_prefix: str | None = None,
    chunk_records: int = 5000,
) -> int:
    """Re-drive the DLQ records with one of `reasons` (None = every `Reason`); returns how many
    were re-driven (re-archived + re-produced). Records already archived are skipped, not
    counted. Each reason has its own consumer group (`<prefix>-<reason>`), so re-driving one
    reason never marks records of another as done."""
    chosen = [r.value for r in Reason] if reasons is None else list(dict.fromkeys(reasons))
    unknown = set(chosen) - {r.value for r in Reason}
    if unknown:
        raise RedriveError(f"unknown reason(s): {', '.join(sorted(unknown))}")
    prefix = group_prefix or f"{settings.worker.app_id}-dlq-replay"
    await ensure_topics(settings)  # the index of re-driven dead letters, on an older install
    redrive = _Redrive(
        settings,
        store or from_settings(settings.archive),
        QuoteValidator.from_settings(settings.quotes),
        chunk_records,
    )
    total = 0
    for reason in chosen:
        total += await redrive.run(reason, f"{prefix}-{reason}")
    return total


class _Redrive:
    def __init__(
        self, settings: Settings, store: ObjectStore, validator: QuoteValidator, chunk: int
    ) -> None:
        self.settings = settings
        self.store = store
        self.validator = validator
        self.chunk = chunk
        self._done: set[Coordinates] = set()
        conf = settings.archive
        self.backoff = Backoff(conf.backoff_initial_seconds, conf.backoff_max_seconds)

    async def run(self, reason: str, group: str) -> int:
        """One pass over the DLQ for one reason, from its group's position to today's end."""
        kafka = self.settings.kafka
        consumer = clients.consumer(
            kafka,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        producer: AIOKafkaProducer | None = None
        await clients.start(consumer, kafka)
        try:
            partitions = await partitions_of(kafka, kafka.dlq_topic)
            if not partitions:
                raise RedriveError(f"topic {kafka.dlq_topic!r} not found")
            tps = await _assign(consumer, kafka.dlq_topic, partitions)
            end = await consumer.end_offsets(tps)
            done = await self._redriven(reason)
            self._done = done
            remaining = {tp for tp in tps if await consumer.position(tp) < end[tp]}
            total = 0
            while remaining:
                records = await _read_chunk(consumer, remaining, end, self.chunk)
                offsets: dict[TopicPartition, int] = {}
                for r in records:
                    tp = TopicPartition(r.topic, r.partition)
                    offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
                selected = self._admissible(_select(records, reason), reason)
                if reason in _ARCHIVE_REASONS:
                    redriven = await self._rearchive(selected) if selected else 0
                    if offsets:
                        await consumer.commit(offsets)
                elif selected:
                    if producer is None:
                        producer = clients.producer(
                            kafka, transactional_id=group, enable_idempotence=True, acks="all"
                        )
                        await clients.start(producer, kafka)
                    index = redriven_topic_name(self.settings)
                    async with producer.transaction():
                        for body, key, value in selected:
                            await producer.send(body["topic"], key=key, value=value)
                            # Key (compaction) and value alike: the read-back sees values.
                            entry = _index_key(reason, body)
                            await producer.send(index, key=entry, value=entry)
                        await producer.send_offsets_to_transaction(offsets, group)
                    done.update(_coordinates(body) for body, _, _ in selected)
                    redriven = len(selected)
                else:
                    redriven = 0
                    if offsets:
                        await consumer.commit(offsets)
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

    def _admissible(self, selected: list[Selected], reason: str) -> list[Selected]:
        """Those that may be re-driven: not done before (by coordinates, across runs), a
        project topic, the whole original carried."""
        kafka = self.settings.kafka
        allowed = (
            {kafka.quotes_topic}
            if reason in _ARCHIVE_REASONS
            else {kafka.quotes_topic, kafka.aggregated_topic}
        )
        kept: list[Selected] = []
        seen: set[Coordinates] = set()
        for body, key, value in selected:
            coordinates = _coordinates(body)
            if coordinates in self._done or coordinates in seen:
                log.info("dead letter already re-driven, skipped", extra=_fields(body))
                continue
            seen.add(coordinates)
            if body["topic"] not in allowed:
                log.error(
                    "dead letter names a topic the re-drive does not write to; left in the DLQ",
                    extra=_fields(body),
                )
                continue
            if is_truncated(body):
                log.error(
                    "dead letter carries a cut original; re-drive it from its topic by hand",
                    extra=_fields(body),
                )
                continue
            kept.append((body, key, value))
        return kept

    async def _redriven(self, reason: str) -> set[Coordinates]:
        """The coordinates re-produced by earlier runs for `reason` (the index topic)."""
        if reason in _ARCHIVE_REASONS:
            return set()  # the archive itself tells what is there
        records, _ = await read_after(
            self.settings.kafka, redriven_topic_name(self.settings), 0, -1
        )
        done: set[Coordinates] = set()
        prefix = f"{reason}|"
        for _, value in records:
            entry = (value or b"").decode("utf-8", "replace")
            if entry.startswith(prefix):
                topic, partition, offset = entry[len(prefix) :].rsplit("|", 2)
                done.add((topic, int(partition), int(offset)))
        return done

    async def _rearchive(self, selected: list[tuple[dict[str, Any], Any, Any]]) -> int:
        bodies = [body for body, _, _ in selected]

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            log.warning(
                "re-drive storage call failed, retrying",
                extra={"operation": "re-archive", "attempt": retries, "error": repr(exc)},
            )

        try:
            written: int = await retry(
                lambda: asyncio.to_thread(rearchive, self.store, self.validator, bodies),
                self.backoff,
                what="re-archive",
                max_retries=self.settings.archive.max_retries,
                on_failure=failed,
            )
        except GaveUp as exc:
            raise RedriveError(
                f"{exc}; nothing was committed, run the re-drive again once storage is reachable"
            ) from exc
        return written


async def _assign(
    consumer: AIOKafkaConsumer, topic: str, partitions: list[int]
) -> list[TopicPartition]:
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    beginning = await consumer.beginning_offsets(tps)
    for tp in tps:
        committed = await consumer.committed(tp)
        # Explicit offsets: seek_to_beginning() races with the consumer's own initial reset.
        consumer.seek(tp, beginning[tp] if committed is None else max(committed, beginning[tp]))
    return tps


async def _read_chunk(
    consumer: AIOKafkaConsumer,
    remaining: set[TopicPartition],
    end: Mapping[TopicPartition, int],
    limit: int,
) -> list[Any]:
    """Up to `limit` records below the end offsets; partitions read to the end leave
    `remaining`."""
    records: list[Any] = []
    while remaining and len(records) < limit:
        fetched = await consumer.getmany(
            *remaining, timeout_ms=1000, max_records=limit - len(records)
        )
        for tp, batch in fetched.items():
            records.extend(r for r in batch if r.offset < end[tp])
        for tp in list(remaining):
            if await consumer.position(tp) >= end[tp]:
                remaining.discard(tp)
    return records


def _select(records: list[Any], reason: str) -> list[tuple[dict[str, Any], Any, Any]]:
    """(dead letter, original key, original value) of the records with `reason`."""
    selected = []
    for r in records:
        try:
            body = parse_dead_letter(r.value)
            if body["reason"] != reason:
                continue
            key, value = original_bytes(body)
        except NotADeadLetter as exc:
            log.warning(
                "not a dead-letter record, skipped",
                extra={"partition": r.partition, "offset": r.offset, "error": str(exc)},
            )
            continue
        selected.append((body, key, value))
    return selected


def _coordinates(body: dict[str, Any]) -> Coordinates:
    return str(body["topic"]), int(body["partition"]), int(body["offset"])


def _index_key(reason: str, body: dict[str, Any]) -> bytes:
    topic, partition, offset = _coordinates(body)
    return f"{reason}|{topic}|{partition}|{offset}".encode()


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "topic": str(body["topic"])[:200],
        "partition": body["partition"],
        "offset": body["offset"],
        "reason": body["reason"],
    }
