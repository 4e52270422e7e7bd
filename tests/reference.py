"""An independent, batch recomputation of the one-minute windows, used to check the worker.

Deliberately naive: group everything, then decide lateness by replaying each partition's
watermark in offset order. No shared code with stockstream.tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    symbol: str
    price: float
    ts: int
    volume: float | None


def expected_windows(
    records: Iterable[Record], window_ms: int = 60_000, grace_ms: int = 5_000, quorum: int = 2
) -> tuple[dict[tuple[str, int], dict[str, Any]], list[Record]]:
    """The windows and the late records. A partition's watermark is the highest event time
    that `quorum` of its symbols have reached (all of them while it has fewer), never
    decreasing; late records move nothing."""
    by_partition: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_partition[r.partition].append(r)
    groups: dict[tuple[str, int], list[Record]] = defaultdict(list)
    late: list[Record] = []
    for recs in by_partition.values():
        watermark = -1
        reached: dict[str, int] = {}
        for r in sorted(recs, key=lambda r: r.offset):
            start = r.ts // window_ms * window_ms
            if start + window_ms + grace_ms <= watermark:
                late.append(r)
                continue
            reached[r.symbol] = max(reached.get(r.symbol, -1), r.ts)
            ranked = sorted(reached.values(), reverse=True)
            watermark = max(watermark, ranked[min(quorum, len(ranked)) - 1])
            groups[(r.symbol, start)].append(r)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for (symbol, start), recs in groups.items():
        prices = [r.price for r in recs]
        first = min(recs, key=lambda r: (r.ts, r.offset))
        last = max(recs, key=lambda r: (r.ts, r.offset))
        vols = [r for r in recs if r.volume is not None]
        volume = sum(r.volume for r in vols) if vols else None  # type: ignore[misc]
        out[(symbol, start)] = {
            "symbol": symbol,
            "window_start_ms": start,
            "count": len(recs),
            "sum": sum(prices),
            "min": min(prices),
            "max": max(prices),
            "avg": sum(prices) / len(prices),
            "open": first.price,
            "close": last.price,
            "volume": volume,
            "vwap": (sum(r.price * r.volume for r in vols) / volume) if volume else None,  # type: ignore[operator]
            "first_event_ms": min(r.ts for r in recs),
            "last_event_ms": max(r.ts for r in recs),
        }
    return out, late


NUMERIC = ("sum", "avg", "vwap", "volume")


def assert_window_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Exact for counts, prices and times; float sums compared to 1e-9 relative."""
    import math

    for name, want in expected.items():
        got = actual[name]
        if name in NUMERIC and want is not None and got is not None:
            assert math.isclose(got, want, rel_tol=1e-9), (name, got, want, expected)
        else:
            assert got == want, (name, got, want, expected)
