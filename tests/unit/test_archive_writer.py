"""The archive's batch encoding: a valid quote Parquet cannot encode is taken out of its batch
(and dead-lettered as archive-rejected by the writer), never failing the batch forever; and
what stays is encoded deterministically, so a re-written batch has the same keys and bytes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockstream.archive import parquet
from stockstream.archive.object_store import LocalDirectoryStore
from stockstream.archive.writer import BatchWriter, StorageCalls
from stockstream.contracts.quotes import QuoteValidator
from stockstream.deadletter import DeadLetters
from stockstream.settings import ArchiveSettings, QuoteSettings

T0 = 1_767_623_400_000


@dataclass
class Record:  # what the archive's consumer hands over (an aiokafka ConsumerRecord has it)
    partition: int
    offset: int
    timestamp: int
    key: bytes
    value: bytes
    topic: str = "stock-quotes"


def raw(offset: int, ts: int = T0, symbol: str = "AAPL") -> Record:
    body = {"symbol": symbol, "current_price": 10.5, "market_timestamp": ts, "source": "replay"}
    return Record(0, offset, ts, symbol.encode(), orjson.dumps(body))


def writer(tmp_path: Path, sent: list[Any]) -> BatchWriter:
    async def send(key: bytes | None, value: bytes) -> Any:
        sent.append(orjson.loads(value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def no_sleep(seconds: float) -> None:
        return None

    conf = ArchiveSettings(local_dir=tmp_path)
    calls = StorageCalls(conf, LocalDirectoryStore(tmp_path), no_sleep)
    return BatchWriter(
        "stock-quotes",
        conf,
        calls,
        QuoteValidator.from_settings(QuoteSettings()),
        int(QuoteSettings().max_future_seconds * 1000),
        DeadLetters(send),
    )


def test_a_row_parquet_refuses_is_taken_out_and_the_rest_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = parquet.encode_table

    def encode(table: Any) -> bytes:
        if 5 in table.column("kafka_offset").to_pylist():
            raise OverflowError("value out of range for the column")
        return real(table)

    monkeypatch.setattr(parquet, "encode_table", encode)
    records = [raw(o, T0 + o) for o in range(10)]
    encoded, refused = writer(tmp_path, []).encode(records)
    assert refused == [(5, "OverflowError: value out of range for the column")]
    assert [o for e in encoded for o in e.offsets] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    again, _ = writer(tmp_path, []).encode(records)
    assert [(e.key, e.data) for e in again] == [(e.key, e.data) for e in encoded]


async def test_refused_rows_are_dead_lettered_and_the_rest_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = parquet.encode_table

    def encode(table: Any) -> bytes:
        if table.column("kafka_offset")[0].as_py() == 1:
            raise ValueError("no")
        return real(table)

    monkeypatch.setattr(parquet, "encode_table", encode)
    sent: list[Any] = []
    batch = writer(tmp_path, sent)
    records = [raw(0), raw(1, T0 + 3_600_000), raw(2)]
    await batch.write(0, -1, records, forced=False, owned=lambda: True)
    assert [(d["reason"], d["offset"]) for d in sent] == [("archive-rejected", 1)]
    stored = LocalDirectoryStore(tmp_path).list("stock-quotes/")
    assert len(stored) == 1 and stored[0].endswith("part-0-0-2.parquet")


bounded = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
epoch_ms = st.integers(min_value=100_000_000_000, max_value=253_402_300_799_999)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "current_price": st.floats(min_value=1e-12, max_value=1e12),
                "market_timestamp": epoch_ms,
                "volume": st.none() | st.floats(min_value=0, max_value=1e15),
                "fetched_at": st.none() | epoch_ms,
                "change_amount": st.none() | bounded,
                "change_percent": st.none() | st.floats(min_value=-1e9, max_value=1e9),
                "prev_close": st.none() | bounded,
            }
        ),
        min_size=1,
        max_size=20,
    )
)
def test_every_valid_quote_encodes_and_reads_back(fields: list[dict[str, Any]]) -> None:
    validator = QuoteValidator(QuoteSettings().symbol_pattern, max_future_ms=2**62)
    records = [
        Record(0, offset, 0, b"AAPL", orjson.dumps({"symbol": "AAPL", "source": "replay", **f}))
        for offset, f in enumerate(fields)
    ]
    rows, rejected = parquet.parse_records(records, validator)
    assert rejected == []
    for _, group in parquet.split_by_hour("stock-quotes", rows):
        table = parquet.read_table(parquet.encode(group))
        assert table.column("current_price").to_pylist() == [r.quote.current_price for r in group]
        assert table.column("kafka_offset").to_pylist() == [r.offset for r in group]
