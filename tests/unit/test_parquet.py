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
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from stockstream.archive import columnar, parquet
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


# -- the column-wise path (what the archive in the worker uses) must be the row path ------

MAX_FUTURE_MS = int(QuoteSettings().max_future_seconds * 1000)


def both_paths(records: list[RawRecord]) -> None:
    """parse_table/split_table/encode_table give exactly what parse_records/split_by_hour/
    encode give: the same rejected records with the same errors, the same keys, the same bytes."""
    rows, rejected = parquet.parse_records(records, validator())
    table, rejected_too = columnar.parse_table(records, validator(), MAX_FUTURE_MS)
    seen = [(r.offset, e.reason, e.error) for r, e in rejected]
    assert [(r.offset, e.reason, e.error) for r, e in rejected_too] == seen
    assert table.schema == parquet.SCHEMA
    by_offset = sorted(table.to_pylist(), key=lambda r: r["kafka_offset"])
    assert by_offset == sorted(parquet.to_table(rows).to_pylist(), key=lambda r: r["kafka_offset"])
    row_objects = [(k, parquet.encode(g)) for k, g in parquet.split_by_hour("t", rows)]
    table_objects = [(k, parquet.encode_table(g)) for k, g in columnar.split_table("t", table)]
    assert [k for k, _ in table_objects] == [k for k, _ in row_objects]
    assert table_objects == row_objects


def body(i: int, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "symbol": f"S{i % 7}",
        "current_price": 100.0 + i / 8,
        "market_timestamp": T0 + i * 97_000,  # several hours
        "source": "simulator",
        "volume": float(i % 5),
        "fetched_at": T0 + i * 97_000 + 3,
        "change_amount": 0.25,
        "change_percent": -0.5,
        "day_high": 120.0,
        "day_low": 90.0,
        "day_open": 95.0,
        "prev_close": 99.5,
        "conditions": None,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def plain(i: int, value: object, key: bytes | None = None, ts: int | None = None) -> RawRecord:
    if key is None and isinstance(value, dict) and isinstance(value.get("symbol"), str):
        key = value["symbol"].encode()
    raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
    return RawRecord(0, i, T0 + i * 97_000 + 10 if ts is None else ts, key, raw)  # type: ignore[arg-type]


def test_column_path_equals_row_path_on_a_plain_batch() -> None:
    both_paths([plain(i, body(i)) for i in range(500)])


ODD: list[dict[str, Any]] = [
    {"current_price": True},
    {"current_price": "1.5"},
    {"current_price": 0},
    {"current_price": 7},  # an int price is valid: stored as 7.0
    {"current_price": -1.0},
    {"current_price": 2e12},
    {"current_price": 2**70},
    {"current_price": DROP},
    {"current_price": None},
    {"market_timestamp": float(T0)},  # an integral float timestamp is valid
    {"market_timestamp": T0 + 0.5},
    {"market_timestamp": True},
    {"market_timestamp": 1_700_000_000},  # seconds
    {"market_timestamp": 2**64},
    {"market_timestamp": T0 + 10**9},  # too far after the record's timestamp
    {"symbol": "aapl "},
    {"symbol": ""},
    {"symbol": "A" * 65},
    {"symbol": 5},
    {"symbol": None},
    {"source": "bogus"},
    {"source": ["simulator"]},
    {"source": None},
    {"volume": -1.0},
    {"volume": False},
    {"volume": 3},
    {"volume": 1e16},
    {"fetched_at": 12.0},
    {"fetched_at": 12},
    {"fetched_at": "now"},
    {"change_percent": 2e9},
    {"change_amount": "x"},
    {"day_high": 80.0},  # below day_low
    {"day_low": None, "day_high": 1.0},
    {"conditions": ["F", "T"]},
    {"conditions": []},
    {"conditions": ["F", 1]},
    {"conditions": ["TOOLONGCODE"]},
    {"conditions": "F"},
    {"conditions": [["F"]]},
    {"conditions": ["é"]},
    {"conditions": ["F"] * 17},
    {"unknown_field": {"nested": True}},
]


def test_column_path_equals_row_path_on_every_kind_of_bad_or_unusual_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = [plain(i, body(i, **changes)) for i, changes in enumerate(ODD)]
    n = len(records)
    records += [
        plain(n, b"{not json", b"S1"),
        plain(n + 1, b"[1, 2]", b"S1"),
        plain(n + 2, None, b"S1"),
        plain(n + 3, b'{"current_price": NaN}', b"S1"),
        plain(n + 4, body(n + 4), key=b"OTHER"),
        plain(n + 5, body(n + 5), ts=None),  # no Kafka timestamp: nothing is in the future
        plain(n + 6, body(n + 6, market_timestamp=T0 + 10**12), ts=-1),
        plain(n + 7, body(n + 7)),
        RawRecord(0, n + 8, T0, None, json.dumps(body(n + 8)).encode()),
    ]
    unusual = len(records)
    records += [plain(i, body(i)) for i in range(unusual, unusual + 20)]
    judged: list[int] = []
    real = parquet.parse_records

    def spy(batch: list[RawRecord], v: QuoteValidator) -> Any:
        judged.extend(r.offset for r in batch)
        return real(batch, v)

    both_paths(records)
    monkeypatch.setattr(columnar, "parse_records", spy)
    columnar.parse_table(records, validator(), MAX_FUTURE_MS)
    # The plain records were decided column-wise, not by a fall-back to the row path.
    assert judged and max(judged) < unusual
    monkeypatch.setattr(columnar, "parse_records", real)
    for changes in ODD:  # and each one alone among plain records
        both_paths([plain(0, body(0)), plain(1, body(1, **changes)), plain(2, body(2))])


def test_column_path_with_nothing_valid_or_nothing_at_all() -> None:
    both_paths([plain(0, b"nope", b"S1"), plain(1, body(1, source="x"))])
    both_paths([])


wild = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(),
    st.floats(min_value=-1e13, max_value=1e13),
    st.integers(min_value=T0 - 10**10, max_value=T0 + 10**10),
    st.text(max_size=9),
    st.lists(st.text(max_size=9), max_size=17),
    st.lists(st.integers(), max_size=2),
)
FIELDS = list(body(0))


@hyp_settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from(FIELDS), wild, max_size=3),
            st.booleans(),  # drop a field?
            st.sampled_from([None, -1, T0, T0 + 40_000_000]),
        ),
        max_size=25,
    )
)
def test_column_path_equals_row_path_for_any_mutation(
    mutations: list[tuple[dict[str, Any], bool, int | None]],
) -> None:
    records = []
    for i, (changes, drop, ts) in enumerate(mutations):
        value = body(i, **changes)
        if drop and changes:
            value.pop(next(iter(changes)))
        key = value["symbol"].encode() if isinstance(value.get("symbol"), str) else b"S1"
        raw = json.dumps(value).encode()  # stdlib: NaN, Infinity and huge ints as written
        records.append(RawRecord(0, i, ts, key, raw))
    both_paths(records)
