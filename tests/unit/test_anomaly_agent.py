"""The anomaly agent with a fake broker: every anomaly written once whatever a crash leaves of
the table (every prefix of its writes, any committed offset), lost acknowledgements, records
Faust's stream skipped, bad windows dead-lettered without stopping it, ANOMALY_ENABLED.
(The real worker against a real broker: tests/integration/test_anomalies.py.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import orjson
import pytest

from stockstream.agents.anomaly.agent import AnomalyDetection
from stockstream.agents.anomaly.emitter import EmittedAnomalies
from stockstream.contracts.anomalies import anomaly_identity, parse_anomaly
from stockstream.contracts.windows import window_record
from stockstream.deadletter import DeadLetters
from stockstream.settings import KafkaSettings, Settings, SettingsError, load_settings
from stockstream.tables.anomaly_state import decode_history

T0 = 1_767_623_400_000
MIN = 60_000
TOPIC = "stock-quotes-aggregated"


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class Event:  # weak-referenceable, as Faust's events are
    message: Message


@dataclass
class Metadata:
    offset: int


@dataclass
class FakeBroker:
    output: list[tuple[int, bytes]] = field(default_factory=list)  # (partition, value)
    dlq: list[dict[str, Any]] = field(default_factory=list)
    fail_sends: list[str] = field(default_factory=list)  # "written" / "lost", in order
    read_backs: int = 0

    async def send_anomaly(self, key: bytes, value: bytes, partition: int) -> Any:
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
        records: list[tuple[int, bytes | None]] = [
            (offset, value)
            for offset, (p, value) in enumerate(self.output)
            if p == partition and offset > after
        ]
        return records, max([after, *(o for o, _ in records)])

    async def send_dead_letter(self, key: bytes | None, value: bytes) -> Any:
        self.dlq.append(orjson.loads(value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(Metadata(len(self.dlq) - 1))
        return future

    def identities(self) -> Counter[tuple[str, int, str]]:
        return Counter(anomaly_identity(parse_anomaly(orjson.loads(v))) for _, v in self.output)


class FakeTopic:
    def __init__(self, send: Any) -> None:
        self._send = send

    async def send(self, *, key: bytes, value: bytes, partition: int) -> Any:
        return await self._send(key, value, partition)


class RecordingTable(dict[str, Any]):
    """The table, with every write in order (what reaches the changelog, in that order)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.writes: list[tuple[str, Any]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append((key, value))
        super().__setitem__(key, value)


@pytest.fixture(name="settings")
def settings_fixture(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "STOCKSTREAM_DATA_DIR": str(tmp_path),
            "ANOMALY_HISTORY_WINDOWS": "6",
            "ANOMALY_MIN_HISTORY": "4",
            "ANOMALY_Z_THRESHOLD": "3",
            "ANOMALY_COOLDOWN_SECONDS": "120",
        },
        dotenv_path=None,
    )


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    sleep = asyncio.sleep

    async def instant(seconds: float) -> None:
        await sleep(0)

    monkeypatch.setattr(asyncio, "sleep", instant)


def make(
    settings: Settings, broker: FakeBroker, table: dict[str, Any], records: list[Event]
) -> AnomalyDetection:
    async def read_range(
        kafka: KafkaSettings, topic: str, partition: int, first: int, last: int
    ) -> list[Any]:
        return [
            e.message
            for e in records
            if e.message.partition == partition and first <= e.message.offset <= last
        ]

    return AnomalyDetection(
        faust.App("unit", broker="kafka://127.0.0.1:1"),
        settings,
        table,
        FakeTopic(broker.send_anomaly),  # type: ignore[arg-type]
        DeadLetters(broker.send_dead_letter),
        read_back=broker.read_after,
        read_range=read_range,
    )


def window_event(
    partition: int, offset: int, symbol: str, minute: int, close: float, volume: float | None
) -> Event:
    record = window_record(
        symbol=symbol,
        start_ms=T0 + minute * MIN,
        end_ms=T0 + (minute + 1) * MIN,
        count=1,
        total=close,
        low=close,
        high=close,
        open_price=close,
        close_price=close,
        volume=volume,
        price_volume=close * (volume or 0.0),
        first_event_ms=T0 + minute * MIN,
        last_event_ms=T0 + minute * MIN,
    )
    return Event(Message(TOPIC, partition, offset, symbol.encode(), orjson.dumps(record)))


def stream() -> list[Event]:
    """Two symbols of partition 0, one of partition 1, interleaved in minute order; A jumps
    at minute 7, its volume spikes at 9 and 10 (10 within the 2-minute cool-down), B's at 8."""
    events: list[Event] = []
    offsets = [0, 0]
    for minute in range(12):
        for partition, symbol in ((0, "A"), (0, "B"), (1, "C")):
            close = 100.0 + (0.2 if minute % 2 else -0.2) + 0.05 * (minute % 3)
            volume = 1_000.0 + 10 * (minute % 4)
            if symbol == "A" and minute >= 7:
                close *= 1.25  # a lasting jump: one return anomaly
            if (symbol, minute) in {("A", 9), ("A", 10), ("B", 8)}:
                volume = 1e6
            events.append(
                window_event(partition, offsets[partition], symbol, minute, close, volume)
            )
            offsets[partition] += 1
    return events


EXPECTED = {
    ("A", T0 + 7 * MIN, "return"),
    ("A", T0 + 9 * MIN, "volume"),
    ("B", T0 + 8 * MIN, "volume"),
}


def batches(events: list[Event], size: int = 4) -> list[list[Event]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def histories(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: decode_history(v) for k, v in table.items() if k.startswith("h|")}


async def test_the_expected_anomalies_once_each_with_their_fields(settings: Settings) -> None:
    broker = FakeBroker()
    agent = make(settings, broker, {}, stream())
    for batch in batches(stream()):
        await agent.process_batch(batch)
    assert broker.identities() == Counter(EXPECTED)
    assert all(p == (0 if orjson.loads(v)["symbol"] in "AB" else 1) for p, v in broker.output)
    jump = next(orjson.loads(v) for _, v in broker.output if orjson.loads(v)["kind"] == "return")
    assert jump["value"] == pytest.approx(1.25 * 100.25 / 99.8 - 1)  # minute 7 vs 6
    assert jump["history"] == 6 and jump["threshold"] == 3.0 and jump["z"] > 3
    assert broker.dlq == []


async def test_every_crash_point_gives_every_anomaly_once(settings: Settings) -> None:
    """A crash after any prefix of any batch's table writes, then a restart from an earlier
    committed offset, from the batch's start, or past it (records the stream skipped): the
    output ends with each expected anomaly exactly once and the same histories."""
    events = stream()
    clean_broker, clean_table = FakeBroker(), RecordingTable()
    clean = make(settings, clean_broker, clean_table, events)
    writes_before: list[int] = []  # table writes before batch j
    output_after: list[int] = []  # output records after batch j's emission
    all_batches = batches(events)
    for batch in all_batches:
        writes_before.append(len(clean_table.writes))
        await clean.process_batch(batch)
        output_after.append(len(clean_broker.output))
    assert clean_broker.identities() == Counter(EXPECTED)
    final = histories(clean_table)
    starts = [0]
    for batch in all_batches:
        starts.append(starts[-1] + len(batch))

    cases = 0
    for j in range(len(all_batches)):
        end = writes_before[j + 1] if j + 1 < len(all_batches) else len(clean_table.writes)
        for cut in range(writes_before[j], end + 1):
            table = RecordingTable()
            for key, value in clean_table.writes[:cut]:
                dict.__setitem__(table, key, value)
            # Resuming past the batch needs a later record to notice the skipped ones.
            resumes = {0, starts[j], starts[j + 1]} - {len(events)}
            for resume in resumes:
                broker = FakeBroker(output=list(clean_broker.output[: output_after[j]]))
                # The restart processes one record, then crashes again (its writes made):
                # what it read back but has not re-judged yet must survive that too.
                first = make(settings, broker, RecordingTable(table), events)
                await first.process_batch(events[resume : resume + 1])
                restarted = make(settings, broker, RecordingTable(first.state._table), events)
                for batch in batches(events[resume:]):
                    await restarted.process_batch(batch)
                assert broker.identities() == Counter(EXPECTED), (j, cut, resume)
                assert histories(restarted.state._table) == final, (j, cut, resume)
                cases += 1
    assert cases > 50


async def test_an_anomaly_whose_ack_was_lost_is_not_written_twice(settings: Settings) -> None:
    broker = FakeBroker(fail_sends=["written"])
    agent = make(settings, broker, {}, stream())
    for batch in batches(stream()):
        await agent.process_batch(batch)
    assert broker.identities() == Counter(EXPECTED)
    assert broker.read_backs == 2 + 1  # two partitions loaded, one failed send


async def test_an_anomaly_the_broker_did_not_write_is_sent_again(settings: Settings) -> None:
    broker = FakeBroker(fail_sends=["lost", "lost"])
    agent = make(settings, broker, {}, stream())
    for batch in batches(stream()):
        await agent.process_batch(batch)
    assert broker.identities() == Counter(EXPECTED)


async def test_bad_windows_are_dead_lettered_and_the_agent_goes_on(settings: Settings) -> None:
    good = [e for e in stream() if e.message.partition == 0]
    bad_values: list[tuple[bytes | None, bytes | None]] = [
        (b"A", b"{not json"),
        (b"A", b"\xff\xfe"),
        (b"A", None),
        (b"A", b"[" * 5000),
        (b"A", orjson.dumps({"symbol": "A", "window_start_ms": "x"})),
        (b"B", orjson.loads(good[0].message.value or b"") and good[0].message.value),
        (b"A", orjson.dumps({**orjson.loads(good[0].message.value or b""), "close": -1.0})),
    ]
    events: list[Event] = []
    offset = 0
    for i, event in enumerate(good):
        if i < len(bad_values):
            key, value = bad_values[i]
            events.append(Event(Message(TOPIC, 0, offset, key, value)))
            offset += 1
        m = event.message
        events.append(Event(Message(TOPIC, 0, offset, m.key, m.value)))
        offset += 1
    broker = FakeBroker()
    agent = make(settings, broker, {}, events)
    for batch in batches(events):
        await agent.process_batch(batch)
    reasons = Counter(d["reason"] for d in broker.dlq)
    assert reasons == Counter({"malformed": 4, "invalid": 3})
    assert {d["offset"] for d in broker.dlq} == {2 * i for i in range(len(bad_values))}
    assert all(d["topic"] == TOPIC for d in broker.dlq)
    assert set(broker.identities()) == {e for e in EXPECTED if e[0] in "AB"}


def test_the_checkpoint_never_passes_an_anomaly_still_to_be_judged() -> None:
    index = EmittedAnomalies()
    records = [
        (10, _anomaly("A", 5)),
        (11, _anomaly("B", 5)),
        (12, _anomaly("A", 6)),
        (13, b"not an anomaly"),
    ]
    assert index.recover("out", 0, records) == 3
    folded = {"A": T0 + 6 * MIN, "B": None}
    assert index.checkpointed(0, 9, folded.get) == 10  # B@5 at 11 pending: not past it
    assert index.emitted(0, ("B", T0 + 5 * MIN, "volume"))
    assert not index.emitted(0, ("A", T0 + 6 * MIN, "volume"))  # folded: left the index
    folded["B"] = T0 + 5 * MIN
    assert index.checkpointed(0, 10, folded.get) == 11
    assert index.checkpointed(0, 11, folded.get) == 11  # never backwards


def _anomaly(symbol: str, minute: int) -> bytes:
    from stockstream.contracts.anomalies import AnomalyKind, anomaly_record

    return orjson.dumps(
        anomaly_record(
            symbol=symbol,
            start_ms=T0 + minute * MIN,
            end_ms=T0 + (minute + 1) * MIN,
            kind=AnomalyKind.VOLUME,
            value=10.0,
            mean=1.0,
            stddev=1.0,
            threshold=3.0,
            history=5,
            close=1.0,
            volume=10.0,
            detected_at_ms=T0,
        )
    )


def test_anomaly_enabled_registers_the_agent_or_not(tmp_path: Path) -> None:
    from stockstream.application import create_app

    def agents(enabled: str) -> set[str]:
        env = {"STOCKSTREAM_DATA_DIR": str(tmp_path), "ANOMALY_ENABLED": enabled}
        app = create_app(load_settings(environ=env, dotenv_path=None))
        return {name.rsplit(".", 1)[-1] for name in app.agents}

    assert "anomalies" in agents("true")
    assert "anomalies" not in agents("false")
    assert "aggregate" in agents("false")


def test_min_history_beyond_the_history_is_refused(tmp_path: Path) -> None:
    env = {
        "STOCKSTREAM_DATA_DIR": str(tmp_path),
        "ANOMALY_HISTORY_WINDOWS": "5",
        "ANOMALY_MIN_HISTORY": "6",
    }
    with pytest.raises(SettingsError, match=r"^ANOMALY_MIN_HISTORY"):
        make(load_settings(environ=env, dotenv_path=None), FakeBroker(), {}, [])
