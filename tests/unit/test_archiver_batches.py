"""How the archive cuts a partition's records into batches (archiver.py `Archiver._add`): a
whole fetch at a time, with the same boundaries a record-by-record reading gives: at
ARCHIVE_BATCH_RECORDS records or ARCHIVE_BATCH_BYTES bytes (key + value), skipping what is
already archived, and cutting a crashed batch exactly at its recorded last offset."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from stockstream.archive.archiver import Archiver, _Partition
from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.archive.parquet import RawRecord
from stockstream.deadletter import DeadLetters
from stockstream.settings import load_settings


def archiver(tmp_path: Path, batch_records: int, batch_bytes: int) -> tuple[Archiver, list[Any]]:
    settings = load_settings(
        environ={
            "ARCHIVE_LOCAL_DIR": str(tmp_path),
            "ARCHIVE_BATCH_RECORDS": str(batch_records),
            "ARCHIVE_BATCH_BYTES": str(batch_bytes),
        },
        dotenv_path=None,
    )

    async def send(key: bytes | None, value: bytes) -> Any:
        raise AssertionError("nothing is dead-lettered here")

    service = Archiver(settings, LocalDirectoryStore(tmp_path), DeadLetters(send))
    batches: list[list[int]] = []

    async def flush(part: _Partition) -> None:  # what _flush does to the partition's state
        batches.append([r.offset for r in part.records])
        part.through = part.records[-1].offset
        part.records, part.nbytes, part.forced_last = [], 0, None

    service._flush = flush  # type: ignore[method-assign]
    return service, batches


def records(sizes: list[int], first: int = 0) -> list[RawRecord]:
    return [RawRecord(0, first + i, 0, b"K", b"v" * (n - 1)) for i, n in enumerate(sizes)]


def one_by_one(
    sizes: list[int], batch_records: int, batch_bytes: int, through: int, forced: int | None
) -> tuple[list[list[int]], list[int]]:
    """The rule, record by record: (flushed batches, what stays buffered)."""
    batches: list[list[int]] = []
    batch: list[int] = []
    nbytes = 0
    for offset, size in enumerate(sizes):
        if offset <= through:
            continue
        if forced is not None and offset > forced:
            if batch:
                batches.append(batch)
                batch, nbytes = [], 0
            forced = None
        batch.append(offset)
        nbytes += size
        if forced is not None:
            if offset >= forced:
                batches.append(batch)
                batch, nbytes, forced = [], 0, None
        elif len(batch) >= batch_records or nbytes >= batch_bytes:
            batches.append(batch)
            batch, nbytes = [], 0
    return batches, batch


@hyp_settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=40), max_size=60),
    fetch=st.integers(min_value=1, max_value=25),
    batch_records=st.integers(min_value=1, max_value=12),
    batch_bytes=st.integers(min_value=1, max_value=200),
    through=st.integers(min_value=-1, max_value=10),
    forced=st.none() | st.integers(min_value=0, max_value=30),
)
def test_fetch_at_a_time_cuts_where_record_by_record_does(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    fetch: int,
    batch_records: int,
    batch_bytes: int,
    through: int,
    forced: int | None,
) -> None:
    if forced is not None and forced <= through:
        forced = None  # the archive only keeps an interrupted batch past `through`
    service, batches = archiver(tmp_path_factory.mktemp("a"), batch_records, batch_bytes)
    part = _Partition(TopicPartition("stock-quotes", 0), ready=True, through=through)
    part.forced_last = forced
    service._parts[0] = part
    all_records = records(sizes)

    async def consume() -> None:
        for start in range(0, len(all_records), fetch):
            await service._add(part, all_records[start : start + fetch])

    asyncio.run(consume())
    expected, buffered = one_by_one(sizes, batch_records, batch_bytes, through, forced)
    assert batches == expected
    assert [r.offset for r in part.records] == buffered
    assert part.nbytes == sum(sizes[o] for o in buffered)


async def test_a_partition_revoked_during_a_flush_stops_taking_records(tmp_path: Path) -> None:
    service, batches = archiver(tmp_path, batch_records=2, batch_bytes=10**6)
    part = _Partition(TopicPartition("stock-quotes", 0), ready=True)
    service._parts[0] = part
    flush = service._flush

    async def flush_then_revoke(p: _Partition) -> None:
        await flush(p)
        service._parts.pop(0)

    service._flush = flush_then_revoke  # type: ignore[method-assign,assignment]
    await service._add(part, records([5] * 7))
    assert batches == [[0, 1]]
    assert part.records == []  # the rest is left to the partition's next owner
