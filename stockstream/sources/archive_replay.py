"""Re-publish an archived range of `stock-quotes` (`produce --source archive`).

Order: per original Kafka partition in offset order, the partitions interleaved by their
records' original Kafka timestamps. The producer keys by symbol, so each symbol lands in the
partition it came from (same partition count) and every partition receives its quotes in the
order the worker first read them: the same quotes are in order, out of order within grace, or
late as the first time. Merging everything by event time instead would silently "repair" the
stream's disorder and make a reprocessing differ from the original processing.

Quotes keep every field, their `source` too: the archiver archives them again, and the models
deduplicate on `(symbol, market_timestamp, source)`. They are sent as fast as the producer
takes them.

A running worker whose watermark is past the range dead-letters re-published quotes as `late`:
re-publishing is for a pipeline that has not processed the range (a new `STOCKSTREAM_APP_ID`,
another environment); `stockstream backfill` repairs the warehouse of this one.

The archive is read by the caller's `read` function (recovery/archive_reader.py, wired in
cli.py), so this source stays apart from the archive stage.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from typing import Protocol

from stockstream.contracts.quotes import Quote

log = logging.getLogger(__name__)

# Quotes yielded between two cooperative yields to the event loop.
_YIELD_EVERY = 1000


class ArchivedQuote(Protocol):
    """One archived quote and where it was in the topic (archive/parquet.py `ArchiveRow`)."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def kafka_timestamp_ms(self) -> int | None: ...

    @property
    def quote(self) -> Quote: ...


#: Reads the archive: every archived quote of the hours overlapping [start_ms, end_ms) of
#: `symbols` (None: all), per partition in offset order.
ArchiveRead = Callable[[int, int, Collection[str] | None], Mapping[int, Sequence[ArchivedQuote]]]


def replay_order(partitions: Mapping[int, Sequence[ArchivedQuote]]) -> Iterator[ArchivedQuote]:
    """Each partition in offset order, partitions merged by original Kafka timestamp."""

    def keyed(rows: Sequence[ArchivedQuote]) -> Iterator[tuple[int, int, int, ArchivedQuote]]:
        last = -1
        for row in rows:
            # A record without a Kafka timestamp (a re-drive) keeps its predecessor's place.
            ts = row.kafka_timestamp_ms if row.kafka_timestamp_ms is not None else last
            last = max(last, ts)
            yield last, row.partition, row.offset, row

    for *_, row in heapq.merge(*(keyed(rows) for _, rows in sorted(partitions.items()))):
        yield row


class ArchiveReplaySource:
    """Archived quotes with `start_ms <= market_timestamp < end_ms` (of `symbols` when given)."""

    def __init__(
        self,
        read: ArchiveRead,
        start_ms: int,
        end_ms: int,
        symbols: Collection[str] | None = None,
    ) -> None:
        if end_ms <= start_ms:
            raise ValueError("the range's end must be after its start")
        self._read = read
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.symbols = None if symbols is None else frozenset(symbols)
        self.replayed = 0

    async def quotes(self) -> AsyncIterator[Quote]:
        self.replayed = 0
        # Object storage is blocking I/O: off the event loop the producer runs on.
        partitions = await asyncio.to_thread(self._read, self.start_ms, self.end_ms, self.symbols)
        for row in replay_order(partitions):
            quote = row.quote
            if not self.start_ms <= quote.market_timestamp < self.end_ms:
                continue
            if self.symbols is not None and quote.symbol not in self.symbols:
                continue
            self.replayed += 1
            yield quote
            if self.replayed % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        log.info(
            "archive replay done",
            extra={"quotes": self.replayed, "partitions": sorted(partitions)},
        )
