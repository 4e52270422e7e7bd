"""The archived quotes of a time range, per Kafka partition in offset order.

The archive is laid out by the UTC hour of `market_timestamp` (archive/parquet.py), so a range
is read as the objects of the hours it overlaps. Both kinds of object count: batches
(`part-...`) and dead letters written back by a re-drive (`replay-...`); a record is identified by
its `(kafka_partition, kafka_offset)`, so one found twice (a re-drive of a record that was
archived after all) is kept once.

An object that cannot be decoded stops the read (`ArchiveReadError` naming it): windows
recomputed without some of their quotes would overwrite correct rows with wrong ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import pyarrow as pa

from stockstream.archive import parquet
from stockstream.archive.object_store import ObjectStore
from stockstream.contracts.quotes import Quote
from stockstream.contracts.timestamps import iso_utc
from stockstream.errors import StockstreamError

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
_TIMESTAMPS = ("market_timestamp", "fetched_at", "kafka_timestamp")
_FLOATS = (
    "volume",
    "change_amount",
    "change_percent",
    "day_high",
    "day_low",
    "day_open",
    "prev_close",
)

#: Called after each object read: (objects done, objects in all).
Progress = Callable[[int, int], None]


class ArchiveReadError(StockstreamError):
    """An archive object that cannot be read as quotes."""


def hour_prefixes(topic: str, start_ms: int, end_ms: int) -> list[str]:
    """Key prefixes of the archive hours overlapping `[start_ms, end_ms)`, in time order."""
    prefixes = []
    hour = start_ms - start_ms % HOUR_MS
    while hour < end_ms:
        date, hh = parquet.event_hour(hour)
        prefixes.append(f"{topic}/date={date}/hour={hh}/")
        hour += HOUR_MS
    return prefixes


def list_objects(store: ObjectStore, topic: str, start_ms: int, end_ms: int) -> list[str]:
    """Keys of the archive objects (batches and re-drives) of the hours of the range."""
    keys: list[str] = []
    for prefix in hour_prefixes(topic, start_ms, end_ms):
        keys.extend(k for k in store.list(prefix) if parquet.parse_key(k) is not None)
    return keys


def _column(table: pa.Table, name: str) -> list[Any]:
    if name not in table.column_names:
        # Objects written before a column existed (e.g. `conditions`) read it as null.
        return [None] * table.num_rows
    column = table.column(name)
    if name in _TIMESTAMPS:
        column = column.cast(pa.int64())
    return list(column.to_pylist())


def decode_rows(key: str, data: bytes) -> list[parquet.ArchiveRow]:
    """The rows of one archive object as contract quotes with their Kafka coordinates."""
    try:
        table = parquet.read_table(data)
        columns = {name: _column(table, name) for name in parquet.SCHEMA.names}
        rows = []
        for i in range(table.num_rows):
            conditions = columns["conditions"][i]
            quote = Quote(
                symbol=str(columns["symbol"][i]),
                current_price=float(columns["current_price"][i]),
                market_timestamp=int(columns["market_timestamp"][i]),
                source=str(columns["source"][i]),
                conditions=None if conditions is None else tuple(str(c) for c in conditions),
                fetched_at=columns["fetched_at"][i],
                **{name: columns[name][i] for name in _FLOATS},
            )
            rows.append(
                parquet.ArchiveRow(
                    partition=int(columns["kafka_partition"][i]),
                    offset=int(columns["kafka_offset"][i]),
                    kafka_timestamp_ms=columns["kafka_timestamp"][i],
                    quote=quote,
                )
            )
    except (pa.ArrowException, OSError, TypeError, ValueError) as exc:
        raise ArchiveReadError(f"archive object {key!r} is unreadable: {exc}") from exc
    return rows


def read_partitions(
    store: ObjectStore,
    topic: str,
    start_ms: int,
    end_ms: int,
    *,
    symbols: Collection[str] | None = None,
    progress: Progress | None = None,
) -> dict[int, list[parquet.ArchiveRow]]:
    """Every archived quote of the hours overlapping `[start_ms, end_ms)` (of `symbols` when
    given), per partition, each once, in offset order."""
    keys = list_objects(store, topic, start_ms, end_ms)
    found: dict[int, dict[int, parquet.ArchiveRow]] = {}
    wanted = None if symbols is None else frozenset(symbols)
    for done, key in enumerate(keys, start=1):
        data = store.get(key)
        if data is None:
            # Listed, then gone: only a concurrent clean-up does that, and it would change
            # the result, so say so instead of recomputing without it.
            raise ArchiveReadError(f"archive object {key!r} disappeared while reading")
        for row in decode_rows(key, data):
            if wanted is None or row.quote.symbol in wanted:
                found.setdefault(row.partition, {}).setdefault(row.offset, row)
        if progress is not None:
            progress(done, len(keys))
    log.info(
        "archive read",
        extra={
            "topic": topic,
            "objects": len(keys),
            "from": iso_utc(start_ms),
            "to": iso_utc(end_ms),
            "rows": sum(len(rows) for rows in found.values()),
        },
    )
    return {p: [rows[o] for o in sorted(rows)] for p, rows in sorted(found.items())}
