"""The replay source (stockstream/sources/replay.py): formats, bad rows, pacing, streaming."""

from __future__ import annotations

import gzip
import logging
import os
import threading
import tracemalloc
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from stockstream.contracts.quotes import Quote, QuoteValidator
from stockstream.settings import QuoteSettings
from stockstream.sources.replay import (
    READERS,
    UNREADABLE,
    RecordReader,
    ReplayError,
    ReplaySource,
    Row,
)

NOW = 1_764_000_000_000  # the wall clock of every test, epoch ms
T0 = NOW - 3_600_000  # recorded an hour ago
VALIDATOR = QuoteValidator(QuoteSettings().symbol_pattern, max_future_ms=300_000)
LOGGER = "stockstream.sources.replay"


def rec(symbol: str = "AAPL", ts: int = T0, price: float = 189.5, **extra: Any) -> dict[str, Any]:
    return {
        "symbol": symbol,
        "current_price": price,
        "market_timestamp": ts,
        "source": "finnhub-quote",
        **extra,
    }


def ndjson(path: Path, *records: dict[str, Any] | str) -> Path:
    lines = [r if isinstance(r, str) else orjson.dumps(r).decode() for r in records]
    data = ("\n".join(lines) + "\n").encode()
    if path.name.lower().endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def csv_file(path: Path, *lines: str) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


class FakeTime:
    """A monotonic clock that only moves when the replay sleeps or the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the replay must never sleep a negative or zero time"
        self.sleeps.append(seconds)
        self.now += seconds


def source(*paths: Path, speed: float = 0, fake: FakeTime | None = None, **kw: Any) -> ReplaySource:
    fake = fake or FakeTime()
    return ReplaySource(
        list(paths),
        speed=speed,
        validator=VALIDATOR,
        clock=fake.clock,
        sleep=fake.sleep,
        wall_clock=lambda: NOW / 1000,
        **kw,
    )


def generator(src: ReplaySource) -> AsyncGenerator[Quote, None]:
    """`quotes()` is an async generator; say so, to be able to close it early."""
    return cast(AsyncGenerator[Quote, None], src.quotes())


async def collect(src: ReplaySource) -> list[Quote]:
    return [q async for q in src.quotes()]


# --- formats -------------------------------------------------------------------------------


async def test_ndjson_keeps_every_field_and_event_time_and_marks_source_replay(
    tmp_path: Path,
) -> None:
    full = rec(
        "MSFT",
        T0 + 1_500,
        410.25,
        volume=1200,
        fetched_at=T0 + 1_600,
        change_amount=-1.5,
        change_percent=-0.36,
        day_high=415.0,
        day_low=405.5,
        day_open=411.0,
        prev_close=411.75,
    )
    no_source = {k: v for k, v in rec("BRK.B", T0 + 2_000).items() if k != "source"}
    path = ndjson(tmp_path / "q.ndjson", rec(), full, no_source)

    quotes = await collect(source(path))

    assert [q.symbol for q in quotes] == ["AAPL", "MSFT", "BRK.B"]
    assert [q.market_timestamp for q in quotes] == [T0, T0 + 1_500, T0 + 2_000]
    assert {q.source for q in quotes} == {"replay"}
    assert quotes[1] == Quote(**{**full, "source": "replay"})


async def test_csv_with_header_nulls_and_parsed_numbers(tmp_path: Path) -> None:
    path = csv_file(
        tmp_path / "q.csv",
        # any column order, an unknown column, a UTF-8 BOM as spreadsheet exports write it
        "\ufeffmarket_timestamp,symbol,current_price,volume,day_high,day_low,note,source",
        f"{T0},AAPL,189.5,,,,first,finnhub-quote",
        f'{T0 + 1000},MSFT, 410 ,300,415.5,405,"quoted, with comma",',
        f"{float(T0 + 2000)},TSLA,1e2,0,,,,simulator",
    )

    quotes = await collect(source(path))

    assert quotes == [
        Quote("AAPL", 189.5, T0, "replay"),
        Quote("MSFT", 410.0, T0 + 1000, "replay", volume=300.0, day_high=415.5, day_low=405.0),
        Quote("TSLA", 100.0, T0 + 2000, "replay", volume=0.0),
    ]
    assert all(type(q.market_timestamp) is int for q in quotes)


@pytest.mark.parametrize("name", ["q.ndjson.gz", "q.jsonl.gz", "Q.NDJSON.GZ"])
async def test_gzip_ndjson(tmp_path: Path, name: str) -> None:
    path = ndjson(tmp_path / name, rec(ts=T0), rec("MSFT", T0 + 5))
    assert [q.symbol for q in await collect(source(path))] == ["AAPL", "MSFT"]


async def test_gzip_csv(tmp_path: Path) -> None:
    path = csv_file(
        tmp_path / "q.csv.gz",
        "symbol,current_price,market_timestamp,volume",
        f"AAPL,1.5,{T0},",
        f"MSFT,2.5,{T0 + 1},7",
    )
    assert await collect(source(path)) == [
        Quote("AAPL", 1.5, T0, "replay"),
        Quote("MSFT", 2.5, T0 + 1, "replay", volume=7.0),
    ]


async def test_directory_is_expanded_recursively_sorted_without_hidden_or_foreign_files(
    tmp_path: Path,
) -> None:
    d = tmp_path / "archive"
    (d / "2026-01-06").mkdir(parents=True)
    (d / "2026-01-05").mkdir()
    (d / "_temporary").mkdir()
    ndjson(d / "2026-01-06" / "a.ndjson", rec("F", T0 + 6))
    ndjson(d / "2026-01-05" / "b.jsonl.gz", rec("E", T0 + 5))
    csv_file(d / "2026-01-05" / "a.csv", "symbol,current_price,market_timestamp", f"D,1,{T0 + 4}")
    ndjson(d / "0.ndjson", rec("C", T0 + 3))
    ndjson(d / ".partial.ndjson", rec("X", T0))  # a writer's file in progress
    ndjson(d / "_temporary" / "part.ndjson", rec("X", T0))
    (d / "README.txt").write_text("not quotes")
    (d / "old.ndjson.bak").write_text("not quotes")

    src = source(d)

    assert [p.relative_to(d).as_posix() for p in src.files] == [
        "0.ndjson",
        "2026-01-05/a.csv",
        "2026-01-05/b.jsonl.gz",
        "2026-01-06/a.ndjson",
    ]
    assert [q.symbol for q in await collect(src)] == ["C", "D", "E", "F"]


async def test_paths_are_replayed_in_the_given_order_and_each_file_once(tmp_path: Path) -> None:
    a = ndjson(tmp_path / "a.ndjson", rec("A"))
    b = ndjson(tmp_path / "b.ndjson", rec("B"))
    src = source(b, a, tmp_path, b)
    assert src.files == [b, a]
    assert [q.symbol for q in await collect(src)] == ["B", "A"]


def test_missing_path_and_unknown_file_type_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ndjson"):
        source(tmp_path / "nope.ndjson")
    (tmp_path / "q.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"q\.parquet: cannot replay this file type"):
        source(tmp_path / "q.parquet")


async def test_empty_directory_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        src = source(tmp_path)
    assert src.files == []
    assert await collect(src) == []
    assert any(r.getMessage() == "replay: no replayable files in directory" for r in caplog.records)


async def test_another_format_plugs_in_through_the_readers_table(tmp_path: Path) -> None:
    def read_fake(path: Path) -> Iterator[Row]:  # what a Parquet reader will look like
        for n, symbol in enumerate(path.read_text().split(), start=1):
            yield Row(n, {"symbol": symbol, "current_price": 1.0, "market_timestamp": T0 + n})

    readers: dict[str, RecordReader] = {**READERS, ".fake": read_fake}
    path = tmp_path / "q.fake"
    path.write_text("AAPL MSFT")
    quotes = await collect(source(path, readers=readers))
    assert [(q.symbol, q.market_timestamp, q.source) for q in quotes] == [
        ("AAPL", T0 + 1, "replay"),
        ("MSFT", T0 + 2, "replay"),
    ]


# --- bad rows ------------------------------------------------------------------------------


def skip_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    return [
        (r.file, r.line, r.reason)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == LOGGER and hasattr(r, "line")
    ]


async def test_invalid_ndjson_rows_are_counted_and_logged_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = ndjson(
        tmp_path / "q.ndjson",
        rec("AAPL", T0),  # 1
        '{"symbol": "AAPL", "current_pri',  # 2 truncated JSON
        "[1, 2]",  # 3 not an object
        "",  # 4 blank: not a record
        rec("AAPL", T0, price=-1),  # 5
        rec(" AAPL", T0),  # 6
        rec("AAPL", NOW + 3_600_000),  # 7 an hour in the future
        rec("AAPL", 1_764_000_000),  # 8 seconds, not ms
        rec("MSFT", T0 + 1),  # 9
    )
    src = source(path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        quotes = await collect(src)

    assert [q.symbol for q in quotes] == ["AAPL", "MSFT"]
    assert src.replayed == 2
    assert src.skipped == {"malformed": 2, "invalid": 4}
    assert skip_logs(caplog) == [
        (str(path), 2, "malformed"),
        (str(path), 3, "malformed"),
        (str(path), 5, "invalid"),
        (str(path), 6, "invalid"),
        (str(path), 7, "invalid"),
        (str(path), 8, "invalid"),
    ]
    messages = [r.getMessage() for r in caplog.records if hasattr(r, "line")]
    assert f"{path}:5" in messages[2] and "current_price must be > 0" in messages[2]
    assert f"{path}:7" in messages[4] and "in the future" in messages[4]
    summary = [r for r in caplog.records if r.getMessage() == "replay finished"]
    assert summary[0].skipped == {"malformed": 2, "invalid": 4}  # type: ignore[attr-defined]


async def test_invalid_csv_rows_are_counted_and_logged_with_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = csv_file(
        tmp_path / "q.csv",
        "symbol,current_price,market_timestamp",  # 1
        f"AAPL,abc,{T0}",  # 2 not a number
        f'"MULTI\nLINE",1,{T0}',  # 3-4 a quoted newline: invalid symbol, reported at 3
        f"AAPL,1,{T0},extra",  # 5 too many cells
        f"AAPL,1,{T0}",  # 6
        f"AAPL,true,{T0}",  # 7
        f"AAPL,,{T0}",  # 8 missing price
    )
    src = source(path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        quotes = await collect(src)

    assert len(quotes) == 1
    assert src.skipped == {"invalid": 4, "malformed": 1}
    assert skip_logs(caplog) == [
        (str(path), 2, "invalid"),
        (str(path), 3, "invalid"),
        (str(path), 5, "malformed"),
        (str(path), 7, "invalid"),
        (str(path), 8, "invalid"),
    ]
    assert "current_price must be a number, got 'abc'" in caplog.records[0].getMessage()


async def test_strict_mode_raises_on_the_first_bad_row_with_file_and_line(tmp_path: Path) -> None:
    path = ndjson(tmp_path / "q.ndjson", rec("AAPL"), rec("AAPL"), rec("AAPL", price=0), "{")
    src = source(path, strict=True)
    seen: list[Quote] = []

    with pytest.raises(ReplayError) as info:
        async for quote in src.quotes():
            seen.append(quote)

    assert len(seen) == 2
    assert str(info.value).startswith(f"{path}:3: invalid: current_price must be > 0")
    assert (info.value.path, info.value.line, info.value.reason) == (path, 3, "invalid")


async def test_truncated_gzip_counts_as_unreadable_and_the_next_file_still_plays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = gzip.compress(b"".join(orjson.dumps(rec(ts=T0 + i)) + b"\n" for i in range(5000)))
    broken = tmp_path / "a.ndjson.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    good = ndjson(tmp_path / "b.ndjson", rec("MSFT"))
    src = source(broken, good)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        quotes = await collect(src)

    assert 0 < len(quotes) < 5001 and quotes[-1].symbol == "MSFT"
    assert src.skipped == {UNREADABLE: 1}
    [(file, line, reason)] = skip_logs(caplog)
    assert (file, reason) == (str(broken), UNREADABLE) and line == len(quotes)  # after the last
    with pytest.raises(ReplayError, match=r"a\.ndjson\.gz:\d+: unreadable"):
        await collect(source(broken, good, strict=True))


async def test_counts_restart_with_each_replay(tmp_path: Path) -> None:
    src = source(ndjson(tmp_path / "q.ndjson", rec(), "nope"))
    await collect(src)
    await collect(src)
    assert (src.replayed, src.skipped) == (1, {"malformed": 1})


# --- pacing --------------------------------------------------------------------------------


async def replay_times(src: ReplaySource, fake: FakeTime, work: float = 0.0) -> list[float]:
    """Clock reading (relative to the start) at which each quote was released."""
    start = fake.now
    times = []
    async for _ in src.quotes():
        times.append(round(fake.now - start, 9))
        fake.now += work  # the consumer's own processing time
    return times


def paced_file(tmp_path: Path, offsets_ms: list[int]) -> Path:
    return ndjson(tmp_path / "q.ndjson", *(rec(ts=T0 + off) for off in offsets_ms))


async def test_pacing_at_10x_follows_event_time_deltas(tmp_path: Path) -> None:
    fake = FakeTime()
    path = paced_file(tmp_path, [0, 1_000, 3_000, 3_000, 8_000])
    times = await replay_times(source(path, speed=10, fake=fake), fake)
    assert times == [0.0, 0.1, 0.3, 0.3, 0.8]
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.5])


async def test_pacing_at_1x_is_the_original_pace(tmp_path: Path) -> None:
    fake = FakeTime()
    path = paced_file(tmp_path, [0, 250, 2_000])
    assert await replay_times(source(path, speed=1, fake=fake), fake) == [0.0, 0.25, 2.0]


async def test_out_of_order_event_times_go_out_immediately(tmp_path: Path) -> None:
    fake = FakeTime()
    path = paced_file(tmp_path, [0, 5_000, 2_000, -1_000, 6_000])
    times = await replay_times(source(path, speed=10, fake=fake), fake)
    assert times == [0.0, 0.5, 0.5, 0.5, 0.6]
    assert fake.sleeps == pytest.approx([0.5, 0.1])  # FakeTime.sleep rejects any delay <= 0


async def test_pacing_does_not_drift_with_consumer_time(tmp_path: Path) -> None:
    fake = FakeTime()
    path = paced_file(tmp_path, [i * 1_000 for i in range(20)])
    times = await replay_times(source(path, speed=10, fake=fake), fake, work=0.03)
    # on the absolute schedule start + n*0.1 s, the consumer's 30 ms included, not added
    assert times == pytest.approx([n * 0.1 for n in range(20)])
    assert fake.sleeps == pytest.approx([0.07] * 19)


async def test_a_slow_consumer_gets_quotes_without_sleeps(tmp_path: Path) -> None:
    fake = FakeTime()
    path = paced_file(tmp_path, [0, 100, 200])
    times = await replay_times(source(path, speed=10, fake=fake), fake, work=1.0)
    assert times == [0.0, 1.0, 2.0] and fake.sleeps == []


async def test_the_schedule_spans_files_and_ignores_skipped_rows(tmp_path: Path) -> None:
    fake = FakeTime()
    a = ndjson(tmp_path / "a.ndjson", "garbage", rec(ts=T0 + 10_000), rec(price=-1))
    b = ndjson(tmp_path / "b.ndjson", rec(ts=T0 + 12_000), rec(ts=T0 + 20_000))
    times = await replay_times(source(a, b, speed=10, fake=fake), fake)
    assert times == [0.0, 0.2, 1.0]


async def test_speed_zero_never_sleeps(tmp_path: Path) -> None:
    fake = FakeTime()
    path = paced_file(tmp_path, [i * 1_000 for i in range(3000)])
    times = await replay_times(source(path, speed=0, fake=fake), fake)
    assert len(times) == 3000 and fake.sleeps == [] and set(times) == {0.0}


@pytest.mark.parametrize("speed", [-1.0, float("nan")])
def test_speed_must_be_a_non_negative_number(tmp_path: Path, speed: float) -> None:
    with pytest.raises(ValueError, match="speed must be >= 0"):
        source(tmp_path, speed=speed)


# --- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "header", "line"),
    [
        ("live.ndjson", b"", orjson.dumps(rec(ts=T0)) + b"\n"),
        ("live.csv", b"symbol,current_price,market_timestamp\n", f"AAPL,1,{T0}\n".encode()),
    ],
)
async def test_first_quote_comes_while_the_file_is_still_being_written(
    tmp_path: Path, name: str, header: bytes, line: bytes
) -> None:
    """A named pipe whose writer waits for the first quote: a reader that loads the whole
    file first could only finish after the writer gives up (10 s) and would fail."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    first_seen = threading.Event()
    writer_saw: list[bool] = []

    def write() -> None:
        with open(fifo, "wb") as pipe:
            pipe.write(header + line)
            pipe.flush()
            writer_saw.append(first_seen.wait(timeout=10))
            pipe.write(line * 3)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    quotes = source(fifo).quotes()
    first = await anext(quotes)
    first_seen.set()
    rest = [q async for q in quotes]
    thread.join(timeout=10)

    assert writer_saw == [True]
    assert first.market_timestamp == T0 and len(rest) == 3


async def test_rows_are_processed_one_at_a_time(tmp_path: Path) -> None:
    path = ndjson(tmp_path / "big.ndjson", rec(), *(["not json"] * 50_000))
    src = source(path)
    quotes = generator(src)
    await anext(quotes)
    assert src.skipped == {}  # none of the 50 000 bad rows after the first was looked at yet
    await quotes.aclose()


async def test_a_big_gzip_file_is_streamed_not_loaded(tmp_path: Path) -> None:
    row = orjson.dumps(rec(ts=T0, volume=1.0, note="x" * 2000)) + b"\n"
    count = 8_000  # about 17 MB uncompressed
    path = tmp_path / "big.ndjson.gz"
    with gzip.open(path, "wb") as out:
        for _ in range(count // 1000):
            out.write(row * 1000)
    src = source(path)

    tracemalloc.start()
    try:
        replayed = 0
        async for _ in src.quotes():
            replayed += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert replayed == count
    assert peak < 2_000_000, f"peak {peak} bytes for a {len(row) * count} byte file"


async def test_stopping_early_closes_the_file(tmp_path: Path) -> None:
    state: list[str] = []

    def read_tracked(path: Path) -> Iterator[Row]:
        state.append("open")
        try:
            for n in range(1, 1_000):
                yield Row(n, rec(ts=T0 + n))
        finally:
            state.append("closed")

    (tmp_path / "t.x").write_text("")
    quotes = generator(source(tmp_path / "t.x", readers={".x": read_tracked}))
    await anext(quotes)
    assert state == ["open"]
    await quotes.aclose()
    assert state == ["open", "closed"]
