"""Windows recomputed from archived quotes by the worker's own window code.

Each partition's quotes go through one `tables.windows.PartitionWindows` in offset order, the
order the worker read them, with the worker's settings (window size, grace, watermark quorum,
excluded trade conditions). So the same quotes are folded, the same ones are late (their
window's watermark had passed: the worker dead-lettered them, they are left out here too) and
the same windows come out. Two things the archive does not record are approximated:

- the idle flush: the worker closes a partition's windows after `AGG_IDLE_TIMEOUT_SECONDS`
  without records. Here a partition counts as idle between two records whose Kafka timestamps
  are further apart than that (a pause of the feed; the worker, keeping up, saw it too), and
  at the end of the quotes read;
- quotes outside the hours read: the caller reads a margin around the range
  (`MARGIN_MS`), so the watermark at the range's edges is the one the worker had, as long as
  the feed's disorder stays within it.

Every symbol of a partition is fed, also when only some are wanted: the watermark is shared by
the partition's symbols (the quorum rule), so leaving symbols out would change which quotes are
late.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stockstream.archive.parquet import ArchiveRow
from stockstream.settings import AggregationSettings
from stockstream.tables.windows import Late, PartitionWindows, WindowAggregate

#: Hours read before and after a range (see the module docstring).
MARGIN_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class WindowRules:
    """The worker's window settings (AGG_*)."""

    size_ms: int
    grace_ms: int
    quorum: int
    excluded_conditions: frozenset[str]
    idle_timeout_ms: int

    @classmethod
    def from_settings(cls, agg: AggregationSettings) -> WindowRules:
        return cls(
            size_ms=agg.window_seconds * 1000,
            grace_ms=int(agg.grace_seconds * 1000),
            quorum=agg.watermark_quorum,
            excluded_conditions=agg.excluded_condition_codes,
            idle_timeout_ms=int(agg.idle_timeout_seconds * 1000),
        )


@dataclass(slots=True)
class Recomputed:
    """Closed windows keyed by `(symbol, window_start_ms)`, and the windows of the quotes that
    were late (one entry per quote)."""

    windows: dict[tuple[str, int], WindowAggregate]
    late: list[tuple[str, int]] = field(default_factory=list)

    def late_within(self, start_ms: int, end_ms: int) -> int:
        return sum(1 for _, start in self.late if start_ms <= start < end_ms)


def recompute_partition(rows: Iterable[ArchiveRow], rules: WindowRules, into: Recomputed) -> None:
    """Fold one partition's rows (in offset order) as the worker did; closed windows go
    `into`."""
    windows = PartitionWindows(
        rules.size_ms,
        rules.grace_ms,
        quorum=rules.quorum,
        excluded_conditions=rules.excluded_conditions,
    )
    previous_ts: int | None = None

    def close(closed: list[WindowAggregate]) -> None:
        windows.remove(closed)
        for window in closed:
            # A symbol archived in two partitions (the partition count changed) keeps the
            # window closed last, as the warehouse's upsert would.
            into.windows[(window.symbol, window.start_ms)] = window

    for row in rows:
        ts = row.kafka_timestamp_ms
        if ts is not None:
            if previous_ts is not None and ts - previous_ts > rules.idle_timeout_ms:
                close(windows.flush())
            previous_ts = ts
        outcome = windows.apply(row.quote, row.offset)
        if isinstance(outcome, Late):
            into.late.append((row.quote.symbol, outcome.window_start_ms))
            continue
        due = windows.closable()
        if due:
            close(due)
    close(windows.flush())


def recompute(partitions: Mapping[int, Sequence[ArchiveRow]], rules: WindowRules) -> Recomputed:
    """Every window the worker closed from these partitions' quotes."""
    result = Recomputed({})
    for _, rows in sorted(partitions.items()):
        recompute_partition(rows, rules, result)
    return result


def select(
    result: Recomputed,
    start_ms: int,
    end_ms: int,
    size_ms: int,
    symbols: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Window records wholly inside `[start_ms, end_ms)` (a window cut by an edge is left
    out: part of it is outside the range asked for), of `symbols` when given, in
    (window_start, symbol) order."""
    wanted = None if symbols is None else frozenset(symbols)
    chosen = [
        window
        for (symbol, start), window in result.windows.items()
        if start >= start_ms and start + size_ms <= end_ms and (wanted is None or symbol in wanted)
    ]
    chosen.sort(key=lambda w: (w.start_ms, w.symbol))
    return [w.to_record() for w in chosen]
