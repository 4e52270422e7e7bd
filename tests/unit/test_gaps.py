"""`stockstream gaps`: the windows of a day the warehouse lacks while the archive has them, the
backfill commands that fill them, and the commands run as printed (real local archive, real
DuckDB file, the real `stockstream` entry point)."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stockstream import cli
from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.contracts.timestamps import iso_utc
from stockstream.recovery.gaps import Gap, GapReport, Range, find_gaps, suggest_ranges
from stockstream.warehouse.duckdb_backend import DuckDBWarehouse
from tests.conftest import ROOT
from tests.unit.test_backfill import RULES, T0, TOPIC, archive, feed, run, stored

DAY = "2026-01-05"
DAY_MS = T0 - (14 * 60 + 30) * 60_000


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[LocalDirectoryStore, Path]:
    store = LocalDirectoryStore(tmp_path / "archive", fsync=False)
    store.ensure_ready()
    archive(store, feed())
    db = tmp_path / "warehouse.duckdb"
    for name, value in {
        "STOCKSTREAM_DATA_DIR": str(tmp_path),
        "ARCHIVE_LOCAL_DIR": str(tmp_path / "archive"),
        "S3_ENDPOINT": "",
        "DUCKDB_PATH": str(db),
        "WAREHOUSE_BACKEND": "duckdb",
        "KAFKA_QUOTES_TOPIC": TOPIC,
        "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
        "LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AGG_WINDOW_SECONDS", "AGG_GRACE_SECONDS", "AGG_WATERMARK_QUORUM"):
        monkeypatch.delenv(name, raising=False)
    return store, db


def delete(db: Path, keys: list[tuple[str, int]]) -> None:
    conn = duckdb.connect(str(db))
    try:
        for symbol, start in keys:
            conn.execute(
                "DELETE FROM aggregates_1m WHERE symbol = ? AND epoch_ms(window_start) = ?",
                [symbol, start],
            )
    finally:
        conn.close()


def report(store: LocalDirectoryStore, db: Path) -> GapReport:
    async def go() -> GapReport:
        warehouse = DuckDBWarehouse(db)
        try:
            return await find_gaps(store, warehouse, TOPIC, RULES, DAY_MS)
        finally:
            await warehouse.close()

    return asyncio.run(go())


MISSING = [
    ("AAA", T0 + 60_000),
    ("AAA", T0 + 120_000),
    ("DDD", T0 + 120_000),
    ("EEE", T0 + 540_000),
]


def test_gaps_are_exactly_the_deleted_windows(env: tuple[LocalDirectoryStore, Path]) -> None:
    store, db = env
    run(store, db)
    assert report(store, db).gaps == ()
    delete(db, MISSING)
    found = report(store, db)
    assert [(g.symbol, g.window_start_ms) for g in found.gaps] == sorted(
        MISSING, key=lambda k: (k[1], k[0])
    )
    assert (found.archive_windows, found.warehouse_windows) == (50, 46)
    # Less than 15 minutes apart: one backfill fills them all.
    assert found.ranges == (Range(T0 + 60_000, T0 + 600_000, ("AAA", "DDD", "EEE")),)


def test_an_empty_warehouse_misses_every_window(env: tuple[LocalDirectoryStore, Path]) -> None:
    store, db = env
    found = report(store, db)
    assert len(found.gaps) == 50
    assert found.ranges == (Range(T0, T0 + 600_000, ("AAA", "BBB", "CCC", "DDD", "EEE")),)


def test_gaps_printed_as_json_and_filled_by_the_printed_commands(
    env: tuple[LocalDirectoryStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, db = env
    assert (
        cli.main(["backfill", "--from", "2026-01-05T14:00:00Z", "--to", "2026-01-05T15:00Z"]) == 0
    )
    complete = stored(db)
    delete(db, MISSING)
    capsys.readouterr()
    assert cli.main(["gaps", "--day", DAY, "--json"]) == 0
    answer: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert answer["day"] == DAY
    assert {(g["symbol"], g["window_start"]) for g in answer["gaps"]} == {
        (symbol, iso_utc(start)) for symbol, start in MISSING
    }
    for suggested in answer["ranges"]:
        argv = shlex.split(suggested["command"])
        assert argv[:2] == ["stockstream", "backfill"]
        assert cli.main(argv[1:]) == 0
    after = stored(db)
    assert set(after) == set(complete)
    for key, row in complete.items():
        if key in MISSING:
            assert {k: v for k, v in after[key].items() if k != "ingested_at"} == {
                k: v for k, v in row.items() if k != "ingested_at"
            }
        else:
            assert after[key] == row  # untouched
    capsys.readouterr()
    assert cli.main(["gaps", "--day", DAY]) == 0
    assert "0 missing" in capsys.readouterr().out


def test_backfill_json_summary(
    env: tuple[LocalDirectoryStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["backfill", "--from", "2026-01-05T14:30Z", "--to", "2026-01-05T14:40Z", "--json"]
    assert cli.main([*argv, "--symbols", "AAA,CCC"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["computed"], first["written"], first["new"], first["unchanged"]) == (
        20,
        20,
        20,
        0,
    )
    assert cli.main([*argv, "--symbols", "AAA,CCC"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["written"], second["changed"], second["unchanged"]) == (0, 0, 20)


@pytest.mark.parametrize(
    "argv",
    [
        ["gaps", "--day", "05/01/2026"],
        ["backfill", "--from", "yesterday", "--to", "2026-01-05"],
        ["backfill", "--from", "2026-01-05T15:00Z", "--to", "2026-01-05T14:00Z"],
    ],
)
def test_bad_arguments_exit_2(
    env: tuple[LocalDirectoryStore, Path], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert "stockstream" in capsys.readouterr().err


def test_an_unusable_warehouse_exits_1_with_the_reason(
    env: tuple[LocalDirectoryStore, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, db = env
    db.write_bytes(b"not a duckdb file")
    assert cli.main(["gaps", "--day", DAY]) == 1
    assert "duckdb" in capsys.readouterr().err


def test_ranges_merge_gaps_less_than_15_minutes_apart() -> None:
    minute = 60_000
    gaps = [Gap("B", T0), Gap("A", T0 + 14 * minute), Gap("A", T0 + 31 * minute)]
    assert suggest_ranges(gaps, minute) == [
        Range(T0, T0 + 15 * minute, ("A", "B")),
        Range(T0 + 31 * minute, T0 + 32 * minute, ("A",)),
    ]
    assert suggest_ranges([], minute) == []


def test_commands_quote_symbols_for_the_shell() -> None:
    command = Range(T0, T0 + 60_000, ("IC MARKETS:1", "COX&KINGS.NS")).command()
    assert shlex.split(command) == [
        "stockstream",
        "backfill",
        "--from",
        "2026-01-05T14:30:00.000Z",
        "--to",
        "2026-01-05T14:31:00.000Z",
        "--symbols",
        "IC MARKETS:1,COX&KINGS.NS",
    ]
