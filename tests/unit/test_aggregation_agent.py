"""The aggregation agent's rules with a fake broker: what is emitted once when sends and
read-backs fail, when a partition is idle, and that a batch ends only once its dead letters
are delivered. (The real worker against a real broker: tests/integration/.)"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockstream.agents.aggregate import idle as idle_module
from stockstream.agents.aggregate.agent import Aggregation
from stockstream.deadletter import DeadLetters
from stockstream.kafka.topics import clock_topic_name
from stockstream.settings import KafkaSettings, Settings, load_settings
from stockstream.tables.state_codec import decode_clock

T0 = 1_767_623_400_000
MIN = 60_000


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = None  # seconds, as Faust's messages carry it


@dataclass
class Event:  # a dataclass instance can be weak-referenced, as Faust's events are
    message: Message


@dataclass
class Batch:  # what Faust delivers from a BatchedTopic: one fetch of one partition
    message: Message
    value: list[Message]


async def feed(agg: Aggregation, events: list[Event]) -> None:
    """Hand `events` to the agent as the consumer would: consecutive records of one topic
    partition together in one batch."""
    batches: list[list[Message]] = []
    for event in events:
        message = event.message
        last = batches[-1][-1] if batches else None
        if last is not None and (last.topic, last.partition) == (message.topic, message.partition):
            batches[-1].append(message)
        else:
            batches.append([message])
    for records in batches:
        last = records[-1]
        batch = Message(last.topic, last.partition, last.offset, None, None, last.timestamp)
        await agg.process_batch(Batch(batch, records))


@dataclass
class Metadata:
    offset: int


@dataclass
class FakeBroker:
    """The output topic and the DLQ: what was written, and sends that fail on request."""

    output: list[tuple[int, bytes]] = field(default_factory=list)  # (partition, value)
    dlq: list[bytes] = field(default_factory=list)
    fail_sends: list[str] = field(default_factory=list)  # "written" / "lost", in order
    fail_dlq: int = 0
    fail_read_backs: int = 0
    read_backs: int = 0
    done: list[tuple[str, int, int, int]] = field(default_factory=list)  # told the consumer

    async def mark_done(self, topic: str, partition: int, first: int, last: int) -> None:
        self.done.append((topic, partition, first, last))

    async def send_window(self, key: bytes, value: bytes, partition: int) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        mode = self.fail_sends.pop(0) if self.fail_sends else "ok"
        if mode in ("ok", "written"):
            self.output.append((partition, value))
        if mode == "ok":
            future.set_result(Metadata(len(self.output) - 1))
        else:  # the broker may have written it; the answer is lost either way
            future.set_exception(TimeoutError("no acknowledgement"))
        return future

    async def read_after(
        self, kafka: KafkaSettings, topic: str, partition: int, after: int
    ) -> tuple[list[tuple[int, bytes | None]], int]:
        self.read_backs += 1
        if self.fail_read_backs:
            self.fail_read_backs -= 1
            raise ConnectionError("broker away")
        records = [
            (offset, value)
            for offset, (p, value) in enumerate(self.output)
            if p == partition and offset > after
        ]
        return records, max([after, *(o for o, _ in records)])

    async def send_dead_letter(self, key: bytes | None, value: bytes) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail_dlq:
            self.fail_dlq -= 1
            future.set_exception(TimeoutError("dlq send lost"))
        else:
            self.dlq.append(value)
            future.set_result(Metadata(len(self.dlq) - 1))
        return future


class FakeTopic:
    def __init__(self, send: Any) -> None:
        self._send = send

    async def send(self, *, key: bytes, value: bytes, partition: int) -> Any:
        return await self._send(key, value, partition)


@pytest.fixture(name="settings")
def settings_fixture(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "STOCKSTREAM_DATA_DIR": str(tmp_path),
            "AGG_IDLE_TIMEOUT_SECONDS": "10",
            "AGG_WATERMARK_QUORUM": "1",
        },
        dotenv_path=None,
    )


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    sleep = asyncio.sleep

    async def instant(seconds: float) -> None:
        await sleep(0)

    # Backoffs would sleep for real: these tests are about decisions, not time.
    monkeypatch.setattr(asyncio, "sleep", instant)


def make(
    settings: Settings,
    broker: FakeBroker,
    end_offset: Any = None,
    table: dict[str, Any] | None = None,
    stream: list[Event] | None = None,
) -> Aggregation:
    app = faust.App("unit", broker="kafka://127.0.0.1:1")
    clock = FakeTopic(lambda key, value, partition: asyncio.sleep(0))

    async def no_end(partition: int) -> int:
        raise AssertionError("no idle check expected")

    async def read_range(
        kafka: KafkaSettings, topic: str, partition: int, first: int, last: int
    ) -> list[Any]:
        return [e.message for e in stream or [] if first <= e.message.offset <= last]

    return Aggregation(
        app,
        settings,
        {} if table is None else table,
        FakeTopic(broker.send_window),  # type: ignore[arg-type]
        clock,  # type: ignore[arg-type]
        DeadLetters(broker.send_dead_letter),
        read_back=broker.read_after,
        read_range=read_range,
        end_offset=end_offset or no_end,
        mark_done=broker.mark_done,
    )


def quote(symbol: str, ts: int, offset: int, price: float = 10.0) -> Event:
    body = {"symbol": symbol, "current_price": price, "market_timestamp": ts, "source": "replay"}
    return Event(Message("stock-quotes", 0, offset, symbol.encode(), orjson.dumps(body)))


def windows_in(output: list[tuple[int, bytes]]) -> Counter[tuple[str, int]]:
    return Counter(
        (orjson.loads(v)["symbol"], orjson.loads(v)["window_start_ms"]) for _, v in output
    )


async def test_a_window_whose_ack_was_lost_is_not_written_twice(settings: Settings) -> None:
    broker = FakeBroker(fail_sends=["written"])
    agg = make(settings, broker)
    await feed(agg, [quote("AAPL", T0 + 1_000, 0), quote("AAPL", T0 + MIN + 6_000, 1)])
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})
    assert broker.read_backs == 2  # at load, and after the failed send


async def test_a_window_the_broker_did_not_write_is_sent_again(settings: Settings) -> None:
    broker = FakeBroker(fail_sends=["lost", "lost"])
    agg = make(settings, broker)
    await feed(agg, [quote("AAPL", T0 + 1_000, 0), quote("AAPL", T0 + MIN + 6_000, 1)])
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})


async def test_windows_of_two_closes_lost_in_a_crash_are_not_written_again(
    settings: Settings,
) -> None:
    """A crash after two closes were emitted but before either was checkpointed: the restart
    reads both back. Re-closing the first must neither forget the second nor checkpoint an
    output offset past it (a second crash would then write it again)."""
    quotes = [
        quote("AAPL", T0 + 1_000, 0),
        quote("AAPL", T0 + MIN + 6_000, 1),
        quote("AAPL", T0 + 2 * MIN + 6_000, 2),
    ]
    first = FakeBroker()
    await feed(make(settings, first), quotes)
    assert windows_in(first.output) == Counter({("AAPL", T0): 1, ("AAPL", T0 + MIN): 1})
    # Restart from a changelog without those closes (nothing checkpointed): same quotes again.
    restarted = FakeBroker(output=list(first.output))
    table: dict[str, Any] = {}
    agg = make(settings, restarted, table=table)
    await feed(agg, quotes[:2])  # re-closes the first window only
    clock = decode_clock(table["c|0"])
    assert clock.emitted_offset == 0, "the checkpoint must not pass the second window"
    # A second crash here: the next worker still finds the second window.
    again = make(settings, restarted, table=dict(table))
    await feed(again, quotes[1:])
    assert windows_in(restarted.output) == Counter({("AAPL", T0): 1, ("AAPL", T0 + MIN): 1})
    await feed(agg, quotes[2:])
    assert windows_in(restarted.output) == Counter({("AAPL", T0): 1, ("AAPL", T0 + MIN): 1})


async def test_records_the_stream_skipped_are_read_and_counted(settings: Settings) -> None:
    stream = [quote("AAPL", T0 + 1_000 * i, i) for i in range(6)]
    broker = FakeBroker()
    agg = make(settings, broker, stream=stream)
    # Faust delivers 0, then 5: 1-4 were skipped (seen after a restart under a rebalance).
    await feed(agg, [stream[0], stream[5], quote("AAPL", T0 + MIN + 6_000, 6)])
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})
    assert orjson.loads(broker.output[0][1])["count"] == 6
    # And the consumer is told they are done, or its commits would stop at offset 1.
    assert broker.done == [("stock-quotes", 0, 1, 4)]


async def test_a_failed_read_back_is_retried_before_anything_is_emitted(
    settings: Settings,
) -> None:
    # Before a restart the window was emitted, but its close never reached the changelog.
    first = FakeBroker()
    await feed(
        make(settings, first), [quote("AAPL", T0 + 1_000, 0), quote("AAPL", T0 + MIN + 6_000, 1)]
    )
    assert windows_in(first.output) == Counter({("AAPL", T0): 1})
    restarted = FakeBroker(output=list(first.output), fail_read_backs=1)
    agg = make(settings, restarted)
    # The restored state re-closes the window (its offsets were not committed): suppressed,
    # because the read-back found it even though the first attempt failed.
    await feed(agg, [quote("AAPL", T0 + 1_000, 0), quote("AAPL", T0 + MIN + 6_000, 1)])
    assert restarted.read_backs == 2
    assert windows_in(restarted.output) == Counter({("AAPL", T0): 1})


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1_000.0]
    monkeypatch.setattr(idle_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr("stockstream.tables.window_state.time.monotonic", lambda: now[0])
    monkeypatch.setattr("stockstream.agents.aggregate.agent.time.monotonic", lambda: now[0])
    return now


async def test_a_blocked_agent_does_not_flush_windows_whose_quotes_are_waiting(
    settings: Settings, clock: list[float]
) -> None:
    end = [1]

    async def end_offset(partition: int) -> int:
        return end[0]

    broker = FakeBroker()
    agg = make(settings, broker, end_offset)
    tick = Event(Message(clock_topic_name(settings), 0, 0, b"tick", b"{}"))
    await feed(agg, [quote("AAPL", T0 + 1_000, 0)])
    # Blocked for 30 s (three idle timeouts: a rebalance, a slow start) while four more
    # quotes arrived; when it resumes, a tick happens to come first.
    clock[0] += 30
    end[0] = 5
    backlog = [quote("AAPL", T0 + 2_000 + i, i) for i in range(1, 5)]
    await feed(agg, [tick, *backlog])
    assert broker.output == []
    # Then nothing else arrives: idle after the timeout, with all five quotes.
    for _ in range(3):
        clock[0] += 5
        await feed(agg, [tick])
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})
    assert orjson.loads(broker.output[0][1])["count"] == 5


async def test_an_end_offset_beyond_the_last_record_delays_but_does_not_stop_the_flush(
    settings: Settings, clock: list[float]
) -> None:
    async def end_offset(partition: int) -> int:
        return 3  # offset 1 and 2 are a transaction's commit markers, not records

    broker = FakeBroker()
    agg = make(settings, broker, end_offset)
    tick = Event(Message(clock_topic_name(settings), 0, 0, b"tick", b"{}"))
    await feed(agg, [quote("AAPL", T0 + 1_000, 0)])
    flushed_at = None
    for step in range(1, 7):
        clock[0] += 5
        await feed(agg, [tick])
        if broker.output and flushed_at is None:
            flushed_at = step * 5
    assert flushed_at is not None and 10 < flushed_at <= 20
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})


async def test_records_the_stream_never_delivers_are_read_before_an_idle_flush(
    settings: Settings, clock: list[float]
) -> None:
    """A stream that dropped records (its consumer past them, nothing processed: a fetch
    delivered while a recovery held the streams) must not end in windows flushed without
    them: after a whole idle timeout the agent reads them directly, then flushes."""
    stream = [quote("AAPL", T0 + 1_000 * i, i) for i in range(5)]

    async def end_offset(partition: int) -> int:
        return 5

    broker = FakeBroker()
    agg = make(settings, broker, end_offset, stream=stream)
    tick = Event(Message(clock_topic_name(settings), 0, 0, b"tick", b"{}"))
    await feed(agg, stream[:1])
    for _ in range(6):
        clock[0] += 5
        await feed(agg, [tick])
    assert broker.done == [("stock-quotes", 0, 1, 4)]
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})
    assert orjson.loads(broker.output[0][1])["count"] == 5


async def test_no_flush_while_the_broker_cannot_say_what_is_waiting(
    settings: Settings, clock: list[float]
) -> None:
    async def end_offset(partition: int) -> int:
        raise ConnectionError("broker away")

    broker = FakeBroker()
    agg = make(settings, broker, end_offset)
    tick = Event(Message(clock_topic_name(settings), 0, 0, b"tick", b"{}"))
    await feed(agg, [quote("AAPL", T0 + 1_000, 0)])
    for _ in range(10):
        clock[0] += 5
        await feed(agg, [tick])
    assert broker.output == []


async def test_a_batch_ends_only_once_its_dead_letters_are_delivered(
    settings: Settings,
) -> None:
    broker = FakeBroker(fail_dlq=2)
    agg = make(settings, broker)
    bad = Event(Message("stock-quotes", 0, 0, b"AAPL", b"{not json"))
    await feed(agg, [bad, quote("AAPL", T0, 1)])
    assert len(broker.dlq) == 1
    assert orjson.loads(broker.dlq[0])["reason"] == "malformed"


async def test_an_error_in_one_record_dead_letters_it_and_the_batch_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = FakeBroker()
    agg = make(settings, broker)
    real = agg.validator.parse

    def parse(key: bytes | None, value: bytes | None, now_ms: int) -> Any:
        if key == b"BOOM":
            raise RuntimeError("a bug")
        return real(key, value, now_ms)

    monkeypatch.setattr(agg.validator, "parse", parse)
    await feed(
        agg,
        [quote("BOOM", T0, 0), quote("AAPL", T0 + 1_000, 1), quote("AAPL", T0 + MIN + 6_000, 2)],
    )
    assert [orjson.loads(d)["reason"] for d in broker.dlq] == ["internal-error"]
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
quote_like = st.fixed_dictionaries(
    {
        "symbol": st.sampled_from(["AAPL", "MSFT", "AAPL\n", "", "X" * 70]) | json_values,
        "current_price": st.floats(min_value=-1e300, max_value=1e300) | json_values,
        "market_timestamp": st.integers(T0 - 10 * MIN, T0 + 10 * MIN) | json_values,
        "source": st.sampled_from(["replay", "simulator", "nope"]),
    },
    optional={
        "volume": st.none() | st.floats() | st.integers(-5, 10**20),
        "fetched_at": st.none() | st.integers(0, 2**64 - 1) | st.floats(),
        "day_high": st.floats(),
        "day_low": st.floats(),
    },
)
records = st.lists(
    st.tuples(
        st.sampled_from([b"AAPL", b"MSFT", None, b"AAPL\n"]),
        st.one_of(
            # json, not orjson: it also writes NaN, Infinity and integers beyond 64 bits.
            quote_like.map(lambda d: json.dumps(d).encode()),
            json_values.map(lambda d: json.dumps(d).encode()),
            st.binary(max_size=64),
            st.none(),
        ),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(records)
def test_any_record_ends_in_a_window_or_in_the_dlq_with_a_reason(
    stream: list[tuple[bytes | None, bytes | None]],
) -> None:
    """Any bytes, any JSON: the agent never raises, never hits an internal error, and every
    record is counted once in an emitted window or dead-lettered with a reason."""
    settings = load_settings(
        environ={"AGG_WATERMARK_QUORUM": "1", "AGG_IDLE_TIMEOUT_SECONDS": "10"}, dotenv_path=None
    )

    async def run() -> FakeBroker:
        broker = FakeBroker()

        async def end_offset(partition: int) -> int:
            return len(stream)

        agg = make(settings, broker, end_offset)
        events = [
            Event(Message("stock-quotes", 0, offset, key, value))
            for offset, (key, value) in enumerate(stream)
        ]
        await feed(agg, events)
        # Then the partition goes idle: every open window comes out.
        windows = agg.state.get(0)
        if windows is not None and windows.open:
            await agg.close_windows(0, windows, windows.flush(), "idle")
        return broker

    broker = asyncio.run(run())
    letters = [orjson.loads(d) for d in broker.dlq]
    assert all(d["reason"] in {"malformed", "invalid", "late"} for d in letters), letters
    counted = sum(orjson.loads(v)["count"] for _, v in broker.output)
    assert counted + len(letters) == len(stream)
    for _, value in broker.output:
        window = orjson.loads(value)
        assert window["count"] >= 1 and window["min"] <= window["max"]
        assert all(not isinstance(v, float) or math.isfinite(v) for v in window.values())


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    from stockstream.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_close_lag_batch_time_and_consumer_lag_are_measured(settings: Settings) -> None:
    import time

    broker = FakeBroker()
    agg = make(settings, broker)
    closes = sample("stockstream_window_close_lag_seconds_count")
    batches = sample("stockstream_agent_batch_seconds_count", {"agent": "aggregate"})
    lag_before = sample("stockstream_window_close_lag_seconds_sum")
    moved = quote("AAPL", T0 + MIN + 6_000, 1)
    moved.message.timestamp = time.time() - 2.0  # appended 2 s ago: it closes AAPL's window
    await feed(agg, [quote("AAPL", T0 + 1_000, 0), moved])
    assert windows_in(broker.output) == Counter({("AAPL", T0): 1})
    assert sample("stockstream_window_close_lag_seconds_count") == closes + 1
    assert sample("stockstream_window_close_lag_seconds_sum") - lag_before >= 2.0
    assert sample("stockstream_agent_batch_seconds_count", {"agent": "aggregate"}) == batches + 1
    # The lag meter: offsets 0..1 processed, the consumer says 5 records exist.
    agg._high_water = lambda partition: 5  # type: ignore[method-assign]
    agg.lag._high_water = agg._high_water
    records, seconds = agg.lag.measure({0})[0]
    assert records == 3 and seconds >= 2.0  # the last processed record is 2 s old


async def test_a_long_batch_gives_the_event_loop_back_now_and_then(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stockstream.agents.aggregate import agent as agent_module

    async def run(yield_every: int) -> list[int]:
        agg = make(settings, FakeBroker())
        await feed(agg, [quote("AAPL", T0, 0)])  # the partition is loaded
        quotes = [quote(f"S{i % 50}", T0 + i, i) for i in range(1, 2_501)]
        seen: list[int] = []

        async def watch() -> None:
            while True:  # what the rest of the worker sees while the batch runs
                seen.append(agg.state.get(0).clock.last_offset)  # type: ignore[union-attr]
                await asyncio.sleep(0)

        monkeypatch.setattr(agent_module, "YIELD_EVERY", yield_every)
        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0)
        await feed(agg, quotes)
        watcher.cancel()
        return seen

    assert sorted(set(await run(1_000))) == [0, 1_000, 2_000]
    assert sorted(set(await run(10**9))) == [0]


async def test_a_restart_resumes_after_the_last_batch_without_re_reading_it(
    settings: Settings,
) -> None:
    """The clock is written with every batch that moved it, so a worker that loads the
    partition (a restart, a rebalance) resumes at the next offset: nothing to read again."""
    table: dict[str, Any] = {}
    stream = [quote(f"S{i % 7}", T0 + 100 * i, i) for i in range(40)]  # one minute, no close
    await feed(make(settings, FakeBroker(), table=table), stream[:30])
    assert decode_clock(table["c|0"]).last_offset == 29
    read: list[tuple[int, int]] = []
    restarted = make(settings, FakeBroker(), table=dict(table), stream=stream)
    real = restarted._read_range

    async def counting(kafka: Any, topic: str, partition: int, first: int, last: int) -> Any:
        read.append((first, last))
        return await real(kafka, topic, partition, first, last)

    restarted._read_range = counting  # type: ignore[method-assign]
    await feed(restarted, stream[30:])
    assert read == []
    windows = restarted.state.get(0)
    assert windows is not None
    assert sum(w.count for w in windows.open.values()) == 40  # each quote once
