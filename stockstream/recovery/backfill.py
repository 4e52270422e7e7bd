"""`stockstream backfill`: windows recomputed from the archive, upserted into the warehouse.

The windows of `[from, to)` are recomputed by the worker's own window code (recompute.py) from
the archived quotes of the range plus a margin, then compared with the rows the warehouse
holds: a window that is missing or differs in any field is written (the warehouse upserts on
`(symbol, window_start)`), an equal one is left alone. So a second run writes nothing, and
rows' `ingested_at` only moves when their values did. A window cut by an edge of the range is
neither computed into the result nor written. Rows the warehouse holds but the archive does not
explain are counted (`only_in_warehouse`), never deleted: the archive may be incomplete.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from stockstream.archive.object_store import ObjectStore
from stockstream.contracts.timestamps import iso_utc
from stockstream.errors import StockstreamError
from stockstream.recovery import archive_reader
from stockstream.recovery.progress import Advance
from stockstream.recovery.recompute import MARGIN_MS, WindowRules, recompute, select
from stockstream.warehouse.base import Warehouse

log = logging.getLogger(__name__)

#: Records per warehouse write (BigQuery splits further by its own request limits).
WRITE_CHUNK = 500


class BackfillError(StockstreamError):
    """The backfill could not complete (the message says what to do)."""


def parse_instant(text: str) -> int:
    """Epoch ms of an ISO-8601 date or timestamp; without a time zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise BackfillError(f"not an ISO-8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_symbols(text: str | None) -> tuple[str, ...] | None:
    """`A,B` -> ('A', 'B'); None or empty -> None (every symbol)."""
    if not text:
        return None
    symbols = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    return symbols or None


@dataclass(slots=True)
class Recomputation:
    """The windows of a range as the worker computed them, and what they came from."""

    records: list[dict[str, Any]]
    objects: int
    late: int


def windows_in_range(
    store: ObjectStore,
    topic: str,
    rules: WindowRules,
    start_ms: int,
    end_ms: int,
    symbols: Collection[str] | None = None,
    progress: Advance | None = None,
) -> Recomputation:
    """The closed windows wholly inside `[start_ms, end_ms)` recomputed from the archive."""
    counted: list[int] = [0]

    def seen(done: int, total: int) -> None:
        counted[0] = total
        if progress is not None:
            progress(done, total)

    # Every symbol is read: the watermark is shared by a partition's symbols.
    partitions = archive_reader.read_partitions(
        store, topic, start_ms - MARGIN_MS, end_ms + MARGIN_MS, progress=seen
    )
    result = recompute(partitions, rules)
    records = select(result, start_ms, end_ms, rules.size_ms, symbols)
    return Recomputation(records, counted[0], result.late_within(start_ms, end_ms))


def _key(record: Mapping[str, Any]) -> tuple[str, int]:
    return str(record["symbol"]), int(record["window_start_ms"])


@dataclass(slots=True)
class BackfillSummary:
    start_ms: int
    end_ms: int
    objects: int = 0
    late: int = 0
    computed: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    only_in_warehouse: int = 0
    rejected: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return self.new + self.changed - len(self.rejected)

    def line(self) -> str:
        text = (
            f"backfill {iso_utc(self.start_ms)} .. {iso_utc(self.end_ms)}:"
            f" {self.computed} windows recomputed from {self.objects} archive objects"
            f" ({self.late} late quotes left out, as the worker did);"
            f" written {self.written} (new {self.new}, changed {self.changed}),"
            f" unchanged {self.unchanged}, only in the warehouse {self.only_in_warehouse}"
        )
        if self.rejected:
            text += f"; rejected by the warehouse {len(self.rejected)}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": iso_utc(self.start_ms),
            "to": iso_utc(self.end_ms),
            "objects": self.objects,
            "late": self.late,
            "computed": self.computed,
            "written": self.written,
            "new": self.new,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "only_in_warehouse": self.only_in_warehouse,
            "rejected": list(self.rejected),
        }


def compare(
    computed: Sequence[Mapping[str, Any]], stored: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]], int, int]:
    """(new, changed, unchanged count, only-in-warehouse count) of the computed records."""
    held = {_key(r): r for r in stored}
    new: list[Mapping[str, Any]] = []
    changed: list[Mapping[str, Any]] = []
    unchanged = 0
    for record in computed:
        row = held.pop(_key(record), None)
        if row is None:
            new.append(record)
        elif dict(row) != dict(record):
            changed.append(record)
        else:
            unchanged += 1
    return new, changed, unchanged, len(held)


async def backfill(
    store: ObjectStore,
    warehouse: Warehouse,
    topic: str,
    rules: WindowRules,
    start_ms: int,
    end_ms: int,
    symbols: Collection[str] | None = None,
    *,
    read_progress: Advance | None = None,
    write_progress: Advance | None = None,
) -> BackfillSummary:
    """Recompute `[start_ms, end_ms)` and write what the warehouse lacks or holds differently."""
    if end_ms <= start_ms:
        raise BackfillError(f"--to ({iso_utc(end_ms)}) must be after --from ({iso_utc(start_ms)})")
    summary = BackfillSummary(start_ms, end_ms)
    computation = windows_in_range(store, topic, rules, start_ms, end_ms, symbols, read_progress)
    summary.objects, summary.late = computation.objects, computation.late
    summary.computed = len(computation.records)
    stored = await warehouse.read(start_ms, end_ms, symbols)
    # Only windows wholly inside the range are compared: a stored window cut by an edge is
    # not part of this backfill.
    stored = [r for r in stored if int(r["window_start_ms"]) + rules.size_ms <= end_ms]
    new, changed, summary.unchanged, summary.only_in_warehouse = compare(
        computation.records, stored
    )
    summary.new, summary.changed = len(new), len(changed)
    pending = [*new, *changed]
    for first in range(0, len(pending), WRITE_CHUNK):
        chunk = pending[first : first + WRITE_CHUNK]
        for rejected in await warehouse.write(chunk):
            symbol, start = _key(chunk[rejected.index])
            summary.rejected.append(f"{symbol} {iso_utc(start)}: {rejected.error}")
        if write_progress is not None:
            write_progress(min(first + WRITE_CHUNK, len(pending)), len(pending))
    log.info("backfill done", extra=summary.as_dict())
    return summary
