"""`produce --source archive`: an archived range re-published per partition in offset order,
partitions interleaved by their original Kafka timestamps, filtered by event time and symbol."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from stockstream.archive import parquet
from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.contracts.quotes import Quote
from stockstream.recovery import archive_reader
from stockstream.settings import load_settings
from stockstream.sources.archive_replay import ArchiveRead, ArchiveReplaySource, replay_order
from tests.conftest import ROOT
from tests.unit.test_backfill import T0, TOPIC, archive, feed


def collect(source: ArchiveReplaySource) -> list[Quote]:
    async def go() -> list[Quote]:
        return [q async for q in source.quotes()]

    return asyncio.run(go())


def reader(store: LocalDirectoryStore) -> ArchiveRead:
    def read(
        start_ms: int, end_ms: int, symbols: Collection[str] | None
    ) -> Mapping[int, Sequence[parquet.ArchiveRow]]:
        return archive_reader.read_partitions(store, TOPIC, start_ms, end_ms, symbols=symbols)

    return read


def test_each_partition_in_offset_order_and_every_quote_once(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path, fsync=False)
    rows = feed()
    archive(store, rows)
    source = ArchiveReplaySource(reader(store), T0 - 600_000, T0 + 3_600_000)
    quotes = collect(source)
    assert sorted(quotes, key=repr) == sorted((r.quote for r in rows), key=repr)
    assert source.replayed == len(rows)
    where = {(r.quote.symbol, r.quote.market_timestamp, r.quote.current_price): r for r in rows}
    for partition in (0, 1):
        offsets = [
            where[(q.symbol, q.market_timestamp, q.current_price)].offset
            for q in quotes
            if where[(q.symbol, q.market_timestamp, q.current_price)].partition == partition
        ]
        assert offsets == sorted(offsets)
    # The late quotes stay where they were: after quotes with later event times.
    times = [q.market_timestamp for q in quotes]
    assert times != sorted(times)


def test_the_range_and_the_symbols_filter(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path, fsync=False)
    rows = feed()
    archive(store, rows)
    start, end = T0 + 120_000, T0 + 300_000
    quotes = collect(ArchiveReplaySource(reader(store), start, end, {"BBB", "DDD"}))
    want = [
        r.quote
        for r in rows
        if start <= r.quote.market_timestamp < end and r.quote.symbol in ("BBB", "DDD")
    ]
    assert sorted(quotes, key=repr) == sorted(want, key=repr)
    assert {q.source for q in quotes} == {"replay"}


def test_partitions_interleave_by_kafka_timestamp() -> None:
    def row(partition: int, offset: int, ts: int | None) -> parquet.ArchiveRow:
        return parquet.ArchiveRow(partition, offset, ts, Quote("A", 1.0, T0 + offset, "replay"))

    merged = replay_order(
        {0: [row(0, 0, 10), row(0, 1, 30), row(0, 2, None)], 1: [row(1, 0, 20), row(1, 1, 40)]}
    )
    assert [(r.partition, r.offset) for r in merged] == [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1)]


def test_the_cli_builds_the_source_from_the_settings(tmp_path: Path) -> None:
    from stockstream.recovery.commands import archive_replay

    store = LocalDirectoryStore(tmp_path / "archive", fsync=False)
    archive(store, feed())
    settings = load_settings(
        environ={"ARCHIVE_LOCAL_DIR": str(tmp_path / "archive"), "KAFKA_QUOTES_TOPIC": TOPIC},
        dotenv_path=None,
        config_dir=ROOT / "config",
    )
    source = archive_replay(settings, "2026-01-05T14:30Z", "2026-01-05T14:31Z", "AAA")
    quotes = collect(source)
    assert quotes and {q.symbol for q in quotes} == {"AAA"}
    assert all(T0 <= q.market_timestamp < T0 + 60_000 for q in quotes)
