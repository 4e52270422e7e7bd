"""`stock-quotes` records -> Parquet (zstd) bytes, and the archive's object layout.

Schema: one typed column per `Quote` field, in contract order, then the record's Kafka
coordinates. It is written explicitly (not inferred from the first rows), so an object whose rows
all lack `volume` still has a float64 `volume` column and every object of the archive has the
same schema:

- `symbol`, `source`: string, not null
- `current_price`: float64, not null
- `market_timestamp`: timestamp[ms, UTC], not null (the contract's epoch ms, typed losslessly)
- `volume`, `change_amount`, `change_percent`, `day_high`, `day_low`, `day_open`, `prev_close`:
  float64, null when the quote has none
- `fetched_at`: timestamp[ms, UTC], null when absent
- `conditions`: list<string>, the trade's condition codes, null when the source has none
  (objects written before the column existed lack it: DuckDB's `union_by_name = true` reads
  them with null there)
- `kafka_partition` (int32), `kafka_offset` (int64), not null: where the record is in the topic
- `kafka_timestamp`: timestamp[ms, UTC], the record's Kafka timestamp (null for DLQ re-drives)

Layout (Hive style, so DuckDB/Spark/Trino prune on `date`/`hour` and read them back as columns):

    <topic>/date=YYYY-MM-DD/hour=HH/part-<partition>-<first offset>-<last offset>.parquet

`date`/`hour` are the UTC date and hour of `market_timestamp` (event time): a batch that spans an
hour boundary becomes one object per hour. `first`/`last` are the smallest and largest offset of
the rows *in that object*; as batches are contiguous offset ranges of one partition, a record
(p, o) whose event hour is H is in object `part-p-f-l` of hour H exactly when f <= o <= l. The
dead-letter re-drive (rearchive.py) relies on that to find out what is already archived. Objects
it writes are named `replay-<partition>-<first>-<last>.parquet` (their offsets are not a
contiguous range, so their membership is read from the object itself; the `replay-` prefix
predates the word "re-drive" and stays, since existing archives are read by it).

Encoding is deterministic: the same rows give the same bytes (same schema, same options, rows
sorted by offset, no wall-clock metadata), so re-writing a batch after a crash re-creates the
identical object under the identical key.

The archive in the worker builds the same objects column-wise (columnar.py); the row
functions here (`parse_records`, `split_by_hour`, `encode`) are the reference it is tested
against, and what the dead-letter re-drive and recovery use.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from stockstream.contracts.quotes import ContractError, Quote, QuoteValidator

_TS = pa.timestamp("ms", tz="UTC")

SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("current_price", pa.float64(), nullable=False),
        pa.field("market_timestamp", _TS, nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("volume", pa.float64()),
        pa.field("fetched_at", _TS),
        pa.field("change_amount", pa.float64()),
        pa.field("change_percent", pa.float64()),
        pa.field("day_high", pa.float64()),
        pa.field("day_low", pa.float64()),
        pa.field("day_open", pa.float64()),
        pa.field("prev_close", pa.float64()),
        pa.field("conditions", pa.list_(pa.string())),
        pa.field("kafka_partition", pa.int32(), nullable=False),
        pa.field("kafka_offset", pa.int64(), nullable=False),
        pa.field("kafka_timestamp", _TS),
    ],
    metadata={"stockstream.contract": "stock-quotes"},
)
QUOTE_COLUMNS = tuple(Quote.__dataclass_fields__)
COMPRESSION = "zstd"
_HOUR_MS = 3_600_000
CONTENT_TYPE = "application/vnd.apache.parquet"
#: Object name prefixes: a batch of the archive, and dead letters written back by a re-drive.
BATCH_KIND = "part"
REDRIVE_KIND = "replay"


@dataclass(frozen=True, slots=True)
class ArchiveRow:
    """One valid quote and where it came from."""

    partition: int
    offset: int
    kafka_timestamp_ms: int | None
    quote: Quote


class RawRecord(NamedTuple):
    """The parts of a Kafka record the archive needs (an aiokafka ConsumerRecord has them)."""

    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None


def parse_records(
    records: Iterable[Any], validator: QuoteValidator
) -> tuple[list[ArchiveRow], list[tuple[Any, ContractError]]]:
    """Valid quotes as rows, plus the records that are not (with why).

    The contract's "not too far in the future" check is made against the record's own Kafka
    timestamp instead of the wall clock: re-reading the same records after a crash must
    classify every record the same way, or the re-written object would differ from the first
    one under the same key. For a live feed the two clocks agree to within the producer's
    latency.
    """
    rows: list[ArchiveRow] = []
    rejected: list[tuple[Any, ContractError]] = []
    for record in records:
        timestamp = (
            record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None
        )
        now_ms = timestamp if timestamp is not None else 2**62
        try:
            quote = validator.parse(record.key, record.value, now_ms)
        except ContractError as exc:
            rejected.append((record, exc))
            continue
        rows.append(ArchiveRow(record.partition, record.offset, timestamp, quote))
    return rows, rejected


def event_hour(epoch_ms: int) -> tuple[str, str]:
    """(`YYYY-MM-DD`, `HH`) of an epoch-milliseconds instant, in UTC."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%H")


def object_key(
    topic: str, date: str, hour: str, partition: int, first: int, last: int, kind: str = BATCH_KIND
) -> str:
    return f"{topic}/date={date}/hour={hour}/{kind}-{partition}-{first}-{last}.parquet"


_KEY = re.compile(
    r"^(?P<topic>.+)/date=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/"
    r"(?P<kind>part|replay)-(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$"
)


class ObjectName(NamedTuple):
    topic: str
    date: str
    hour: str
    kind: str
    partition: int
    first: int
    last: int


def parse_key(key: str) -> ObjectName | None:
    """The parts of an archive object key, or None for anything else (manifests, strays)."""
    match = _KEY.match(key)
    if match is None:
        return None
    return ObjectName(
        match["topic"],
        match["date"],
        match["hour"],
        match["kind"],
        int(match["partition"]),
        int(match["first"]),
        int(match["last"]),
    )


def split_by_hour(
    topic: str, rows: Iterable[ArchiveRow], kind: str = BATCH_KIND
) -> list[tuple[str, list[ArchiveRow]]]:
    """Group rows of ONE partition by the UTC (date, hour) of their event time.

    Returns (key, rows sorted by offset) per group, in key order: a deterministic function of the
    rows, whatever order they came in.
    """
    groups: dict[int, list[ArchiveRow]] = defaultdict(list)
    partitions = set()
    for row in rows:
        partitions.add(row.partition)
        # Epoch hours: whole hours since 1970 UTC (leap seconds do not exist in epoch time).
        groups[row.quote.market_timestamp // _HOUR_MS].append(row)
    if len(partitions) > 1:
        raise ValueError(f"rows of several partitions in one batch: {sorted(partitions)}")
    out = []
    for epoch_hour, group in sorted(groups.items()):
        date, hour = event_hour(epoch_hour * _HOUR_MS)
        group.sort(key=lambda r: r.offset)
        key = object_key(
            topic, date, hour, group[0].partition, group[0].offset, group[-1].offset, kind
        )
        out.append((key, group))
    return out


def to_table(rows: Sequence[ArchiveRow]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for row in rows:
        quote = row.quote
        for name in QUOTE_COLUMNS:
            columns[name].append(getattr(quote, name))
        columns["kafka_partition"].append(row.partition)
        columns["kafka_offset"].append(row.offset)
        columns["kafka_timestamp"].append(row.kafka_timestamp_ms)
    arrays = [pa.array(columns[field.name], type=field.type) for field in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def encode(rows: Sequence[ArchiveRow]) -> bytes:
    """Parquet bytes (zstd, one row group, statistics on) of the rows, in the given order."""
    return encode_table(to_table(rows))


def encode_table(table: pa.Table) -> bytes:
    """Parquet bytes (zstd, one row group, statistics on) of the table's rows, in its order."""
    buffer = io.BytesIO()
    pq.write_table(
        table.combine_chunks(),
        buffer,
        compression=COMPRESSION,
        # One batch is one row group: readers prune whole objects by their statistics.
        row_group_size=max(1, table.num_rows),
        use_dictionary=["symbol", "source"],
        write_statistics=True,
    )
    return buffer.getvalue()


def read_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))
