"""The archive's Parquet encoding and object layout (stockstream/archive/parquet.py)."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stockstream.archive import parquet
from stockstream.archive.parquet import ArchiveRow, RawRecord
from stockstream.contracts.quotes import Quote, QuoteValidator
from stockstream.settings import QuoteSettings

T0 = 1_767_623_400_000  # 2026-01-05T14:30:00Z
HOUR_MS = 3_600_000


def validator() -> QuoteValidator:
    return QuoteValidator.from_settings(QuoteSettings())


def quote(symbol: str = "AAPL", ts: int = T0, price: float = 187.5, **extra: object) -> Quote:
    return Quote(symbol=symbol, current_price=price, market_timestamp=ts, source="replay", **extra)  # type: ignore[arg-type]


def row(offset: int, ts: int = T0, partition: int = 0, **extra: Any) -> ArchiveRow:
    return ArchiveRow(partition, offset, T0 + 1000, quote(ts=ts, **extra))


def record(
    offset: int, value: object, key: bytes | None = b"AAPL", ts: int | None = T0
) -> RawRecord:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return RawRecord(0, offset, ts, key, raw)


def test_schema_has_one_typed_column_per_contract_field_then_kafka_coordinates() -> None:
    contract = [f.name for f in dataclasses.fields(Quote)]
    assert parquet.SCHEMA.names == [*contract, "kafka_partition", "kafka_offset", "kafka_timestamp"]
    types = {f.name: f.type for f in parquet.SCHEMA}
    ts = pa.timestamp("ms", tz="UTC")
    assert types["symbol"] == pa.string() and types["source"] == pa.string()
    assert types["market_timestamp"] == ts and types["fetched_at"] == ts
    assert types["kafka_timestamp"] == ts
    for name in ("current_price", "volume", "change_amount", "change_percent", "day_high",
                 "day_low", "day_open", "prev_close"):  # fmt: skip
        assert types[name] == pa.float64(), name
    assert types["kafka_partition"] == pa.int32() and types["kafka_offset"] == pa.int64()
    required = {f.name for f in parquet.SCHEMA if not f.nullable}
    assert required == {
        "symbol",
        "current_price",
        "market_timestamp",
        "source",
        "kafka_partition",
        "kafka_offset",
    }


def test_round_trip_keeps_values_nulls_and_types() -> None:
    rows = [
        row(
            7, volume=120.0, fetched_at=T0 + 5, day_high=190.0, day_low=180.0, change_percent=-1.25
        ),
        row(8, ts=T0 + 1),  # every optional field null
    ]
    data = parquet.encode(rows)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert meta.num_rows == 2 and meta.num_row_groups == 1
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}
    table = parquet.read_table(data)
    assert table.schema.equals(parquet.SCHEMA, check_metadata=False)
    first, second = table.to_pylist()
    assert first["symbol"] == "AAPL" and first["current_price"] == 187.5
    assert first["market_timestamp"] == datetime(2026, 1, 5, 14, 30, tzinfo=UTC)
    assert first["fetched_at"] == datetime(2026, 1, 5, 14, 30, 0, 5000, tzinfo=UTC)
    assert first["volume"] == 120.0 and first["change_percent"] == -1.25
    assert (first["kafka_partition"], first["kafka_offset"]) == (0, 7)
    assert first["kafka_timestamp"] == datetime(2026, 1, 5, 14, 30, 1, tzinfo=UTC)
    assert second["volume"] is None and second["fetched_at"] is None and second["day_high"] is None
    # Epoch milliseconds survive exactly.
    assert table.column("market_timestamp").cast(pa.int64()).to_pylist() == [T0, T0 + 1]


def test_encoding_is_deterministic_and_schema_does_not_depend_on_the_rows() -> None:
    rows = [row(i, ts=T0 + i) for i in range(100)]
    assert parquet.encode(rows) == parquet.encode(list(rows))
    # No row has a volume: the column is still float64, not an inferred null type.
    assert parquet.read_table(parquet.encode(rows[:1])).schema.field("volume").type == pa.float64()


def test_split_by_hour_uses_utc_event_time_and_offsets_of_each_object() -> None:
    rows = [
        row(10, ts=T0),  # 14:30
        row(11, ts=T0 + HOUR_MS),  # 15:30
        row(12, ts=T0 - 10),  # 14:29:59.990
        row(13, ts=T0 + 10 * HOUR_MS),  # 00:30 next day
        row(14, ts=T0 + 29 * 60_000 + 59_999),  # 14:59:59.999
    ]
    groups = parquet.split_by_hour("stock-quotes", reversed(rows))
    assert [(key, [r.offset for r in g]) for key, g in groups] == [
        ("stock-quotes/date=2026-01-05/hour=14/part-0-10-14.parquet", [10, 12, 14]),
        ("stock-quotes/date=2026-01-05/hour=15/part-0-11-11.parquet", [11]),
        ("stock-quotes/date=2026-01-06/hour=00/part-0-13-13.parquet", [13]),
    ]


def test_split_refuses_rows_of_several_partitions() -> None:
    with pytest.raises(ValueError, match="several partitions"):
        parquet.split_by_hour("t", [row(1, partition=0), row(2, partition=1)])


def test_keys_parse_back_and_other_keys_do_not() -> None:
    key = parquet.object_key("quotes-x", "2026-01-05", "09", 2, 100, 250)
    assert key == "quotes-x/date=2026-01-05/hour=09/part-2-100-250.parquet"
    assert parquet.parse_key(key) == ("quotes-x", "2026-01-05", "09", "part", 2, 100, 250)
    replay = parquet.object_key("a/b", "2026-01-05", "09", 0, 1, 9, kind="replay")
    assert parquet.parse_key(replay) == ("a/b", "2026-01-05", "09", "replay", 0, 1, 9)
    assert parquet.parse_key("_progress/quotes-x/partition-0.json") is None
    assert parquet.parse_key("quotes-x/date=2026-01-05/hour=09/.part-2-1-2.parquet.ab.tmp") is None


def test_parse_records_keeps_valid_quotes_and_reports_the_rest() -> None:
    good = {"symbol": "AAPL", "current_price": 1.5, "market_timestamp": T0, "source": "replay"}
    records = [
        record(0, good),
        record(1, b"{not json"),
        record(2, {**good, "current_price": -1}),
        record(3, good, key=b"MSFT"),  # key must equal the symbol
        record(4, b"null"),
        record(5, {**good, "volume": 3}),
    ]
    rows, rejected = parquet.parse_records(records, validator())
    assert [(r.partition, r.offset, r.kafka_timestamp_ms) for r in rows] == [(0, 0, T0), (0, 5, T0)]
    assert rows[1].quote.volume == 3.0
    assert [(r.offset, e.reason.value) for r, e in rejected] == [
        (1, "malformed"),
        (2, "invalid"),
        (3, "invalid"),
        (4, "malformed"),
    ]


def test_future_check_uses_the_record_timestamp_so_a_re_read_classifies_alike() -> None:
    """A quote 10 minutes ahead of its Kafka timestamp is invalid today and tomorrow alike
    (against the wall clock it would turn valid later, and a re-written object would differ)."""
    ahead = {"symbol": "AAPL", "current_price": 1.5, "market_timestamp": T0 + 600_000,
             "source": "replay"}  # fmt: skip
    rows, rejected = parquet.parse_records([record(0, ahead, ts=T0)], validator())
    assert rows == [] and rejected[0][1].reason.value == "invalid"
    rows, _ = parquet.parse_records([record(0, ahead, ts=T0 + 600_000)], validator())
    assert len(rows) == 1
    # No Kafka timestamp: no future check rather than a wall-clock one.
    rows, _ = parquet.parse_records([record(0, ahead, ts=None)], validator())
    assert len(rows) == 1 and rows[0].kafka_timestamp_ms is None
