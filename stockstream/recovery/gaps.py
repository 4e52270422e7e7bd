"""`stockstream gaps`: the windows of a day the warehouse lacks while the archive has them.

"Has them" means: the worker's window code, fed the day's archived quotes (recompute.py), closes
that window. A minute whose only quotes were late has no window in the stream either, so it is
not a gap. Each gap is `(symbol, window_start)`; gaps less than `MERGE_WITHIN_MS` apart are
grouped into ranges, each with the `stockstream backfill` command that fills it (windows in a
range that are already stored and equal are left alone by the backfill, so a range may safely
cover them).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stockstream.archive.object_store import ObjectStore
from stockstream.contracts.timestamps import iso_utc
from stockstream.recovery.backfill import windows_in_range
from stockstream.recovery.progress import Advance
from stockstream.recovery.recompute import WindowRules
from stockstream.warehouse.base import Warehouse

DAY_MS = 86_400_000
#: Gaps at most this far apart share one backfill range.
MERGE_WITHIN_MS = 15 * 60_000


@dataclass(frozen=True, slots=True)
class Gap:
    symbol: str
    window_start_ms: int


@dataclass(frozen=True, slots=True)
class Range:
    """A backfill that fills some gaps: `[start_ms, end_ms)` for `symbols`."""

    start_ms: int
    end_ms: int
    symbols: tuple[str, ...]

    def command(self) -> str:
        return shlex.join(
            [
                "stockstream",
                "backfill",
                "--from",
                iso_utc(self.start_ms),
                "--to",
                iso_utc(self.end_ms),
                "--symbols",
                ",".join(self.symbols),
            ]
        )


@dataclass(frozen=True, slots=True)
class GapReport:
    day_start_ms: int
    archive_windows: int
    warehouse_windows: int
    gaps: tuple[Gap, ...]
    ranges: tuple[Range, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "day": iso_utc(self.day_start_ms)[:10],
            "archive_windows": self.archive_windows,
            "warehouse_windows": self.warehouse_windows,
            "gaps": [
                {"symbol": g.symbol, "window_start": iso_utc(g.window_start_ms)} for g in self.gaps
            ],
            "ranges": [
                {
                    "from": iso_utc(r.start_ms),
                    "to": iso_utc(r.end_ms),
                    "symbols": list(r.symbols),
                    "command": r.command(),
                }
                for r in self.ranges
            ],
        }

    def text(self) -> str:
        day = iso_utc(self.day_start_ms)[:10]
        lines = [
            f"{day}: {self.archive_windows} windows in the archive,"
            f" {self.warehouse_windows} in the warehouse, {len(self.gaps)} missing"
        ]
        for gap in self.gaps:
            lines.append(f"  missing {gap.symbol} {iso_utc(gap.window_start_ms)}")
        if self.ranges:
            lines.append("fill them with:")
            lines.extend(f"  {r.command()}" for r in self.ranges)
        return "\n".join(lines)


def suggest_ranges(gaps: Sequence[Gap], size_ms: int) -> list[Range]:
    """Backfill ranges covering the gaps: one per run of gaps less than MERGE_WITHIN_MS apart."""
    ranges: list[Range] = []
    ordered = sorted(gaps, key=lambda g: (g.window_start_ms, g.symbol))
    start = end = 0
    symbols: set[str] = set()
    for gap in ordered:
        if symbols and gap.window_start_ms - end > MERGE_WITHIN_MS:
            ranges.append(Range(start, end, tuple(sorted(symbols))))
            symbols = set()
        if not symbols:
            start = gap.window_start_ms
        end = max(end, gap.window_start_ms + size_ms)
        symbols.add(gap.symbol)
    if symbols:
        ranges.append(Range(start, end, tuple(sorted(symbols))))
    return ranges


async def find_gaps(
    store: ObjectStore,
    warehouse: Warehouse,
    topic: str,
    rules: WindowRules,
    day_start_ms: int,
    progress: Advance | None = None,
) -> GapReport:
    """The gap report of the UTC day starting at `day_start_ms`."""
    end_ms = day_start_ms + DAY_MS
    computed = windows_in_range(store, topic, rules, day_start_ms, end_ms, progress=progress)
    stored = await warehouse.read(day_start_ms, end_ms)
    held = {(str(r["symbol"]), int(r["window_start_ms"])) for r in stored}
    gaps = tuple(
        Gap(r["symbol"], r["window_start_ms"])
        for r in computed.records
        if (r["symbol"], r["window_start_ms"]) not in held
    )
    return GapReport(
        day_start_ms=day_start_ms,
        archive_windows=len(computed.records),
        warehouse_windows=len(held),
        gaps=gaps,
        ranges=tuple(suggest_ranges(gaps, rules.size_ms)),
    )
