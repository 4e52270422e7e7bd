"""What the inspection pages show, as JSON-ready dicts built from this worker's state.

Pure functions of the window state (tables/window_state.py), the recent closed windows
(recent.py) and the clock: no Faust, no I/O, so every field can be tested alone. A partition
this worker owns but has not loaded yet (no record since it was assigned) is reported as
`"loaded": false`; the others carry what the aggregation knows about them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stockstream.contracts.timestamps import iso_utc
from stockstream.tables.windows import PartitionWindows, WindowAggregate
from stockstream.web.recent import RecentWindows


def _iso_ms(epoch_ms: int) -> str | None:
    return iso_utc(epoch_ms) if epoch_ms >= 0 else None


def _iso_s(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else iso_utc(int(epoch_s * 1000))


def open_window(window: WindowAggregate) -> dict[str, Any]:
    """An open window: its record so far and the last source offset folded into it."""
    return {**window.to_record(), "last_offset": window.last_offset}


def closed_window(window: WindowAggregate) -> dict[str, Any]:
    """A closed window: exactly the record emitted to the output topic."""
    return window.to_record()


def _open_by_symbol(windows: PartitionWindows | None) -> dict[str, list[WindowAggregate]]:
    found: dict[str, list[WindowAggregate]] = {}
    if windows is not None:
        for window in sorted(windows.open.values(), key=lambda w: (w.symbol, w.start_ms)):
            found.setdefault(window.symbol, []).append(window)
    return found


def partition_snapshot(
    partition: int,
    windows: PartitionWindows | None,
    recent: RecentWindows,
    quiet_seconds: float | None,
    idle_timeout_seconds: float,
) -> dict[str, Any]:
    """One source partition: its clock, idle state, open windows per symbol.

    `quiet_seconds`: how long the agent has processed nothing of it (None: not loaded).
    `last_emitted_offset` is the highest output offset known: the checkpointed one (in the
    clock, survives restarts) or a later one an emit reported since."""
    clock = windows.clock if windows is not None else None
    by_symbol = _open_by_symbol(windows)
    names = sorted(set(by_symbol) | set(recent.symbols(partition)))
    known = (recent.last_offset(partition), clock.emitted_offset if clock else None)
    last_emitted = max((o for o in known if o is not None), default=-1)
    return {
        "partition": partition,
        "loaded": windows is not None,
        "watermark": _iso_ms(clock.watermark_ms) if clock else None,
        "watermark_ms": clock.watermark_ms if clock else None,
        "last_offset": clock.last_offset if clock else None,
        "emitted_offset": clock.emitted_offset if clock else None,
        "last_emitted_offset": last_emitted if last_emitted >= 0 else None,
        "idle": {
            "quiet_seconds": None if quiet_seconds is None else round(quiet_seconds, 3),
            "timeout_seconds": idle_timeout_seconds,
            # The idle clock (agents/aggregate/idle.py) also asks the broker that nothing is
            # waiting before it flushes: this is the agent's half of that rule.
            "idle": quiet_seconds is not None and quiet_seconds >= idle_timeout_seconds,
        },
        "open_windows": sum(len(ws) for ws in by_symbol.values()),
        "history_since": _iso_s(recent.since(partition)),
        "symbols": [
            {"symbol": name, "open": [open_window(w) for w in by_symbol.get(name, [])]}
            for name in names
        ],
    }


def symbol_view(
    symbol: str,
    partition: int,
    windows: PartitionWindows | None,
    recent: RecentWindows,
    last: int,
) -> dict[str, Any]:
    """One symbol: its open window(s) (more than one while an ended one waits out the grace)
    and its `last` most recently closed windows, newest first."""
    clock = windows.clock if windows is not None else None
    opened = _open_by_symbol(windows).get(symbol, [])
    closed = recent.last(symbol, last)
    return {
        "symbol": symbol,
        "partition": partition,
        "loaded": windows is not None,
        "watermark": _iso_ms(clock.watermark_ms) if clock else None,
        "open": [open_window(w) for w in opened],
        "closed": [closed_window(w) for w in closed],
        "last": last,
        "history_since": _iso_s(recent.since(partition)),
    }


def symbol_rows(partitions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every symbol of the given partition snapshots with its partition, owner and open
    windows, sorted by symbol."""
    rows = [
        {
            "symbol": entry["symbol"],
            "partition": snap["partition"],
            "owner": snap.get("owner"),
            "open": entry["open"],
        }
        for snap in partitions
        for entry in snap.get("symbols", [])
    ]
    rows.sort(key=lambda r: (r["symbol"], r["partition"]))
    return rows
