"""Writing dead-lettered quotes back into the archive, each original (partition, offset) once.

`stockstream dlq redrive` (stockstream/redrive.py) hands the `archive-failed` dead letters
here once storage is back. They are written under their ORIGINAL partition and offset as
`<topic>/date=/hour=/replay-<partition>-<first>-<last>.parquet`, not produced to `stock-quotes`
again: the aggregation already folded those records (only the archive failed), so a second copy
at a new offset would be counted twice or dead-lettered as late, and the archive would hold the
quote under two offsets.

A record (p, o) of event hour H is already archived if an object `part-p-f-l` of that hour has
f <= o <= l (archive batches are contiguous offset ranges, parquet.py) or a `replay-p-*` object
of that hour contains it. So a crash between writing and committing, a dead letter present
twice (the DLQ is at-least-once) or a PUT the archive counted as failed although the server
stored it never produce a second copy. Objects written here have no `kafka_timestamp` (the DLQ
does not carry it).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stockstream.archive import parquet
from stockstream.archive.object_store import ObjectStore
from stockstream.archive.parquet import ArchiveRow
from stockstream.contracts.dead_letters import NotADeadLetter, original_bytes
from stockstream.contracts.quotes import ContractError, QuoteValidator

log = logging.getLogger(__name__)

Present = Callable[[int, int], bool]


def rearchive(
    store: ObjectStore, validator: QuoteValidator, dead_letters: Iterable[Mapping[str, Any]]
) -> int:
    """Write the dead-lettered quotes that are not in the archive yet; returns how many.
    Synchronous (storage calls): run it in a thread."""
    now_ms = int(time.time() * 1000)
    rows: dict[tuple[str, int, int], ArchiveRow] = {}
    for body in dead_letters:
        try:
            raw_key, raw_value = original_bytes(body)
            quote = validator.parse(raw_key, raw_value, now_ms)
        except (ContractError, NotADeadLetter) as exc:
            log.warning(
                "dead-lettered record is not a valid quote, not archived",
                extra={"partition": body["partition"], "offset": body["offset"], "error": str(exc)},
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
        present = archived(store, f"{topic}/date={date}/hour={hour}/")
        missing: dict[int, list[ArchiveRow]] = defaultdict(list)
        for partition, offset, row in members:
            if not present(partition, offset):
                missing[partition].append(row)
        for _, group in sorted(missing.items()):
            for key, object_rows in parquet.split_by_hour(topic, group, kind=parquet.REDRIVE_KIND):
                store.put(key, parquet.encode(object_rows), parquet.CONTENT_TYPE)
                written += len(object_rows)
                log.info(
                    "re-archived dead letters", extra={"key": key, "records": len(object_rows)}
                )
    return written


def archived(store: ObjectStore, prefix: str) -> Present:
    """A predicate: is (partition, offset) of this (date, hour) directory already archived?"""
    ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
    exact: set[tuple[int, int]] = set()
    for key in store.list(prefix):
        name = parquet.parse_key(key)
        if name is None:
            continue
        if name.kind == parquet.BATCH_KIND:
            ranges[name.partition].append((name.first, name.last))
            continue
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
