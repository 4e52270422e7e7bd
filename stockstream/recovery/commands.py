"""`stockstream backfill` and `stockstream gaps`: the configured archive and warehouse wired to
backfill.py / gaps.py, and what is printed. Exit status: 0 done, 1 the archive or the
warehouse failed (or refused rows), 2 bad arguments.

Output contract (Airflow DAGs call these commands): `backfill` prints one summary line, or with
`--json` one JSON object (`from`, `to`, `computed`, `written`, `new`, `changed`, `unchanged`,
`only_in_warehouse`, `late`, `objects`, `rejected`); `gaps --json` prints one JSON object
(`day`, `gaps`: [{`symbol`, `window_start`}], `ranges`: [{`from`, `to`, `symbols`, `command`}],
`archive_windows`, `warehouse_windows`). Progress goes to stderr, on a terminal only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Mapping, Sequence
from datetime import date

from stockstream.archive import object_store
from stockstream.archive.parquet import ArchiveRow
from stockstream.recovery import archive_reader
from stockstream.recovery.backfill import (
    BackfillError,
    backfill,
    parse_instant,
    parse_symbols,
)
from stockstream.recovery.gaps import find_gaps
from stockstream.recovery.progress import ProgressBar
from stockstream.recovery.recompute import WindowRules
from stockstream.settings import Settings
from stockstream.sources.archive_replay import ArchiveReplaySource
from stockstream.warehouse import backends
from stockstream.warehouse.base import WarehouseUnavailable


def _fail(command: str, message: str, status: int) -> int:
    print(f"stockstream {command}: {message}", file=sys.stderr)
    return status


async def run_backfill(
    settings: Settings, start: str, end: str, symbols: str | None, as_json: bool
) -> int:
    try:
        start_ms, end_ms = parse_instant(start), parse_instant(end)
        if end_ms <= start_ms:
            raise BackfillError(f"--to {end} must be after --from {start}")
    except BackfillError as exc:
        return _fail("backfill", str(exc), 2)
    store = object_store.from_settings(settings.archive)
    warehouse = backends.from_settings(settings)
    try:
        with ProgressBar() as bar:
            summary = await backfill(
                store,
                warehouse,
                settings.kafka.quotes_topic,
                WindowRules.from_settings(settings.aggregation),
                start_ms,
                end_ms,
                parse_symbols(symbols),
                read_progress=bar.step("reading the archive"),
                write_progress=bar.step("writing windows"),
            )
    except (archive_reader.ArchiveReadError, WarehouseUnavailable, BackfillError) as exc:
        return _fail("backfill", str(exc), 1)
    finally:
        await warehouse.close()
    print(json.dumps(summary.as_dict()) if as_json else summary.line())
    for rejected in summary.rejected:
        print(f"rejected: {rejected}", file=sys.stderr)
    return 1 if summary.rejected else 0


async def run_gaps(settings: Settings, day: str, as_json: bool) -> int:
    try:
        day_start_ms = parse_instant(date.fromisoformat(day).isoformat())
    except (ValueError, BackfillError):
        return _fail("gaps", f"--day: expected YYYY-MM-DD, got {day!r}", 2)
    store = object_store.from_settings(settings.archive)
    warehouse = backends.from_settings(settings)
    try:
        with ProgressBar() as bar:
            report = await find_gaps(
                store,
                warehouse,
                settings.kafka.quotes_topic,
                WindowRules.from_settings(settings.aggregation),
                day_start_ms,
                progress=bar.step("reading the archive"),
            )
    except (archive_reader.ArchiveReadError, WarehouseUnavailable) as exc:
        return _fail("gaps", str(exc), 1)
    finally:
        await warehouse.close()
    print(json.dumps(report.as_dict()) if as_json else report.text())
    return 0


def archive_replay(
    settings: Settings, start: str | None, end: str | None, symbols: str | None
) -> ArchiveReplaySource:
    """The source of `produce --source archive`; SystemExit naming a bad argument."""
    if not start or not end:
        raise SystemExit("stockstream produce --source archive needs --from ISO --to ISO")
    try:
        start_ms, end_ms = parse_instant(start), parse_instant(end)
    except BackfillError as exc:
        raise SystemExit(f"stockstream produce: {exc}") from exc
    if end_ms <= start_ms:
        raise SystemExit(f"stockstream produce: --to {end} must be after --from {start}")
    store = object_store.from_settings(settings.archive)
    topic = settings.kafka.quotes_topic

    def read(
        first_ms: int, last_ms: int, wanted: Collection[str] | None
    ) -> Mapping[int, Sequence[ArchiveRow]]:
        return archive_reader.read_partitions(store, topic, first_ms, last_ms, symbols=wanted)

    return ArchiveReplaySource(read, start_ms, end_ms, parse_symbols(symbols))
