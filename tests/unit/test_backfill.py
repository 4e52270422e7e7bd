"""`stockstream backfill`: windows recomputed from a real (local) archive with the worker's
window code, upserted into a real DuckDB warehouse: equal to an independent recomputation,
idempotent, changed rows found and repaired, range edges, `--symbols`."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stockstream.archive import parquet
from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.contracts.quotes import Quote
from stockstream.contracts.timestamps import iso_utc
from stockstream.recovery.archive_reader import ArchiveReadError
from stockstream.recovery.backfill import BackfillError, BackfillSummary, backfill, parse_instant
from stockstream.recovery.recompute import WindowRules, recompute
from stockstream.warehouse.duckdb_backend import DuckDBWarehouse
from tests.reference import Record, assert_window_equal, expected_windows

T0 = 1_767_623_400_000  # 2026-01-05T14:30:00Z
TOPIC = "stock-quotes"
RULES = WindowRules(
    size_ms=60_000,
    grace_ms=5_000,
    quorum=2,
    excluded_conditions=frozenset({"12"}),
    idle_timeout_ms=30_000,
)
SYMBOLS = ("AAA", "BBB", "CCC", "DDD", "EEE")


def feed(minutes: int = 10, per_minute: int = 6, seed: int = 3) -> list[parquet.ArchiveRow]:
    """Archived rows of two partitions in offset order: a price walk per symbol, local
    disorder within grace and a few quotes two minutes late."""
    rng = random.Random(seed)
    events: list[tuple[int, str, float, float | None]] = []
    for symbol in SYMBOLS:
        price = rng.uniform(10, 500)
        for m in range(minutes):
            for _ in range(per_minute):
                price = round(price * (1 + rng.gauss(0, 0.002)), 4)
                ts = T0 + m * 60_000 + rng.randrange(60_000)
                events.append((ts, symbol, price, None if rng.random() < 0.1 else 10.0))
    events.sort()
    for i in range(0, len(events) - 1, 3):
        if events[i + 1][0] - events[i][0] < 3_000:
            events[i], events[i + 1] = events[i + 1], events[i]
    late = [(ts - 120_000, s, p, v) for i, (ts, s, p, v) in enumerate(events) if i % 97 == 60]
    for n, event in enumerate(late):
        events.insert(80 + n * 90, event)
    rows: list[parquet.ArchiveRow] = []
    offsets = [0, 0]
    for n, (ts, symbol, price, volume) in enumerate(events):
        partition = SYMBOLS.index(symbol) % 2
        quote = Quote(symbol, price, ts, "replay", volume=volume)
        rows.append(parquet.ArchiveRow(partition, offsets[partition], T0 + 600_000 + n, quote))
        offsets[partition] += 1
    return rows


def archive(store: LocalDirectoryStore, rows: list[parquet.ArchiveRow], batch: int = 40) -> None:
    """Write rows as the archive writer does: batches of consecutive offsets per partition,
    one object per event hour."""
    for partition in (0, 1):
        mine = [r for r in rows if r.partition == partition]
        for first in range(0, len(mine), batch):
            for key, group in parquet.split_by_hour(TOPIC, mine[first : first + batch]):
                store.put(key, parquet.encode(group))


def references(rows: list[parquet.ArchiveRow]) -> dict[tuple[str, int], dict[str, Any]]:
    records = [
        Record(r.partition, r.offset, r.quote.symbol, r.quote.current_price,
               r.quote.market_timestamp, r.quote.volume)
        for r in rows
    ]  # fmt: skip
    windows, late = expected_windows(records, quorum=RULES.quorum)
    assert late, "the data set must contain late quotes"
    return windows


def stored(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    conn = duckdb.connect(str(path), read_only=True)
    try:
        cursor = conn.execute("SELECT *, epoch_ms(window_start) AS ws FROM aggregates_1m")
        names = [d[0] for d in cursor.description]
        out = {}
        for values in cursor.fetchall():
            row = dict(zip(names, values, strict=True))
            out[(row["symbol"], row["ws"])] = row
        return out
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalDirectoryStore:
    s = LocalDirectoryStore(tmp_path / "archive", fsync=False)
    s.ensure_ready()
    return s


@pytest.fixture
def rows(store: LocalDirectoryStore) -> list[parquet.ArchiveRow]:
    data = feed()
    archive(store, data)
    return data


def run(
    store: LocalDirectoryStore,
    db: Path,
    start_ms: int = T0,
    end_ms: int = T0 + 600_000,
    symbols: tuple[str, ...] | None = None,
) -> BackfillSummary:
    async def go() -> BackfillSummary:
        warehouse = DuckDBWarehouse(db)
        try:
            return await backfill(store, warehouse, TOPIC, RULES, start_ms, end_ms, symbols)
        finally:
            await warehouse.close()

    return asyncio.run(go())


def test_backfill_equals_an_independent_recomputation(
    store: LocalDirectoryStore, rows: list[parquet.ArchiveRow], tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    summary = run(store, db)
    want = references(rows)
    got = stored(db)
    assert set(got) == set(want)
    for key, expected in want.items():
        assert_window_equal(got[key], expected)
    assert summary.computed == summary.new == summary.written == len(want) == 50
    assert (summary.changed, summary.unchanged, summary.only_in_warehouse) == (0, 0, 0)
    assert summary.late > 0 and summary.objects > 2


def test_backfill_writes_exactly_what_the_engine_emits(
    store: LocalDirectoryStore, rows: list[parquet.ArchiveRow], tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    run(store, db)
    by_partition: dict[int, list[parquet.ArchiveRow]] = {0: [], 1: []}
    for row in rows:
        by_partition[row.partition].append(row)
    engine = {k: w.to_record() for k, w in recompute(by_partition, RULES).windows.items()}

    async def read() -> list[dict[str, Any]]:
        warehouse = DuckDBWarehouse(db)
        try:
            return await warehouse.read(T0, T0 + 600_000)
        finally:
            await warehouse.close()

    back = {(r["symbol"], r["window_start_ms"]): r for r in asyncio.run(read())}
    assert back == engine


def test_second_run_changes_nothing(store: LocalDirectoryStore, tmp_path: Path) -> None:
    archive(store, feed())
    db = tmp_path / "w.duckdb"
    first = run(store, db)
    before = stored(db)
    second = run(store, db)
    assert (second.new, second.changed, second.written) == (0, 0, 0)
    assert second.unchanged == first.computed == 50
    assert stored(db) == before  # not even ingested_at moved


def test_a_changed_row_is_found_and_repaired(store: LocalDirectoryStore, tmp_path: Path) -> None:
    archive(store, feed())
    db = tmp_path / "w.duckdb"
    run(store, db)
    before = stored(db)
    conn = duckdb.connect(str(db))
    conn.execute(
        "UPDATE aggregates_1m SET close = close + 1"
        " WHERE symbol = 'CCC' AND window_start = TIMESTAMP '2026-01-05 14:33:00'"
    )
    conn.close()
    summary = run(store, db)
    assert (summary.changed, summary.new, summary.unchanged) == (1, 0, 49)
    after = stored(db)
    key = ("CCC", T0 + 3 * 60_000)
    assert after[key]["close"] == before[key]["close"]
    assert after[key]["ingested_at"] > before[key]["ingested_at"]
    assert {k: v for k, v in after.items() if k != key} == {
        k: v for k, v in before.items() if k != key
    }


def test_windows_cut_by_the_range_edges_are_not_written(
    store: LocalDirectoryStore, rows: list[parquet.ArchiveRow], tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    start, end = T0 + 2 * 60_000 + 30_000, T0 + 6 * 60_000 - 1
    summary = run(store, db, start, end)
    got = stored(db)
    assert {start for _, start in got} == {T0 + m * 60_000 for m in (3, 4)}
    assert summary.computed == len(got) == 2 * len(SYMBOLS)
    want = references(rows)
    for key, row in got.items():
        assert_window_equal(row, want[key])  # the whole window, not its part in the range


def test_only_the_symbols_asked_for(
    store: LocalDirectoryStore, rows: list[parquet.ArchiveRow], tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    summary = run(store, db, symbols=("BBB", "EEE"))
    got = stored(db)
    assert {symbol for symbol, _ in got} == {"BBB", "EEE"}
    assert summary.computed == 20
    # The watermark is shared with the partition's other symbols: same windows as a full run.
    want = references(rows)
    for key, row in got.items():
        assert_window_equal(row, want[key])


def test_stored_rows_the_archive_does_not_explain_are_counted_not_deleted(
    store: LocalDirectoryStore, tmp_path: Path
) -> None:
    archive(store, feed())
    db = tmp_path / "w.duckdb"
    run(store, db)
    conn = duckdb.connect(str(db))
    conn.execute(
        "INSERT INTO aggregates_1m SELECT * REPLACE ('ZZZ' AS symbol) FROM aggregates_1m"
        " WHERE symbol = 'AAA' AND window_start = TIMESTAMP '2026-01-05 14:31:00'"
    )
    conn.close()
    summary = run(store, db)
    assert summary.only_in_warehouse == 1
    assert ("ZZZ", T0 + 60_000) in stored(db)


def test_an_unreadable_object_stops_the_backfill(
    store: LocalDirectoryStore, tmp_path: Path
) -> None:
    archive(store, feed())
    key = parquet.object_key(TOPIC, "2026-01-05", "14", 0, 900, 901)
    store.put(key, b"PAR1 not parquet")
    db = tmp_path / "w.duckdb"
    with pytest.raises(ArchiveReadError, match="part-0-900-901"):
        run(store, db)
    assert not db.exists() or stored(db) == {}


def test_a_redriven_copy_of_a_record_counts_once(
    store: LocalDirectoryStore, rows: list[parquet.ArchiveRow], tmp_path: Path
) -> None:
    again = [r for r in rows if r.partition == 1][:5]
    for key, group in parquet.split_by_hour(TOPIC, again, kind=parquet.REDRIVE_KIND):
        store.put(key, parquet.encode(group))
    db = tmp_path / "w.duckdb"
    run(store, db)
    want = references(rows)
    got = stored(db)
    for key, expected in want.items():
        assert_window_equal(got[key], expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-05T14:30:00Z", T0),
        ("2026-01-05T14:30:00.000Z", T0),
        ("2026-01-05T15:30:00+01:00", T0),
        ("2026-01-05T14:30", T0),
        ("2026-01-05", T0 - (14 * 60 + 30) * 60_000),
    ],
)
def test_times_are_iso_and_utc_without_a_zone(text: str, expected: int) -> None:
    assert parse_instant(text) == expected
    assert iso_utc(parse_instant(text)).endswith("Z")


def test_a_reversed_range_is_refused(store: LocalDirectoryStore, tmp_path: Path) -> None:
    with pytest.raises(BackfillError, match="must be after"):
        run(store, tmp_path / "w.duckdb", T0 + 60_000, T0)
