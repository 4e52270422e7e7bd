"""The worker's delivery loop step (kafka/faust_transport.py): inline while a delivery does not
block, else continued exactly as a Task would, under Faust's `wait_first`; and the batched
delivery (kafka/record_batches.py): what a batch carries and how its acknowledgement reaches
Faust's commit bookkeeping. The loop itself runs in every worker integration test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import faust
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from stockstream.kafka.faust_transport import (
    FETCH_MAX_WAIT_MS,
    LeanConsumer,
    Transport,
    deliver,
    fetch_max_wait_ms,
)
from stockstream.kafka.record_batches import (
    BATCH_BUFFER_SIZE,
    BatchedTopic,
    RecordBatch,
    is_batched,
)
from stockstream.settings import SettingsError, load_settings


class WaitFirst:
    """Faust's `Service.wait_first`, reduced to what `deliver` relies on: the delivery runs in
    its own task and is cancelled when the flow is suspended first."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, delivery: Any, suspended: Any) -> None:
        self.calls += 1
        task = asyncio.ensure_future(delivery)
        stop = asyncio.ensure_future(suspended)
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (task, stop):
            if fut not in done:
                fut.cancel()
        if task in done:
            task.result()


async def test_a_delivery_that_does_not_block_runs_inline() -> None:
    delivered: list[int] = []

    async def callback(message: int) -> None:
        delivered.append(message)

    wait_first = WaitFirst()
    tasks_before = len(asyncio.all_tasks())
    await deliver(callback, 7, wait_first, asyncio.Event())
    assert delivered == [7]
    assert wait_first.calls == 0
    assert len(asyncio.all_tasks()) == tasks_before


async def test_a_blocked_delivery_goes_on_under_wait_first_with_its_awaited_results() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def callback(message: int) -> None:
        seen.append(await gate)  # e.g. a full stream buffer
        await asyncio.sleep(0)  # a bare yield on the way
        seen.append(await asyncio.sleep(0.01, result=f"after {message}"))

    wait_first = WaitFirst()
    asyncio.get_running_loop().call_later(0.01, gate.set_result, "room")
    await deliver(callback, 3, wait_first, asyncio.Event())
    assert seen == ["room", "after 3"]
    assert wait_first.calls == 1


async def test_an_exception_after_blocking_reaches_the_caller() -> None:
    async def callback(message: int) -> None:
        await asyncio.sleep(0.01)
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        await deliver(callback, 1, WaitFirst(), asyncio.Event())


async def test_suspending_the_flow_cancels_a_blocked_delivery_inside_the_callback() -> None:
    cancelled = asyncio.Event()

    async def callback(message: int) -> None:
        try:
            await asyncio.sleep(30)  # blocked until the flow is suspended
        except asyncio.CancelledError:
            cancelled.set()
            raise

    suspended = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, suspended.set)
    await asyncio.wait_for(deliver(callback, 1, WaitFirst(), suspended), timeout=5)
    assert cancelled.is_set()


def test_the_transport_uses_the_lean_consumer_and_the_idempotent_producer() -> None:
    assert Transport.Consumer is LeanConsumer
    assert Transport.Producer._settings_extra is not Transport.__mro__[1].Producer._settings_extra


def test_the_fetch_wait_comes_from_the_settings_and_has_a_default_for_bare_apps() -> None:
    class App:
        settings = load_settings({"STOCKSTREAM_FETCH_MAX_WAIT_SECONDS": "0.25"}, dotenv_path=None)

    assert fetch_max_wait_ms(App()) == 250
    assert fetch_max_wait_ms(object()) == FETCH_MAX_WAIT_MS == 100
    for bad in ("0", "11", "x"):
        with pytest.raises(SettingsError, match="STOCKSTREAM_FETCH_MAX_WAIT_SECONDS"):
            load_settings({"STOCKSTREAM_FETCH_MAX_WAIT_SECONDS": bad}, dotenv_path=None)


# -- batched delivery (kafka/record_batches.py) -------------------------------------------


def record(offset: int, partition: int = 0, topic: str = "quotes") -> ConsumerMessage:
    return ConsumerMessage(topic, partition, offset, 1.0, 0, [], b"k", b"v", None)


def kafka_record(
    offset: int, partition: int = 0, topic: str = "quotes"
) -> ConsumerRecord[bytes, bytes]:
    """A record as aiokafka returns it (a batch holds these)."""
    return ConsumerRecord(topic, partition, offset, 1_000, 0, b"k", b"v", None, 1, 1, ())


@pytest.fixture(name="consumer")
def consumer_fixture() -> Iterator[LeanConsumer]:
    app = faust.App("unit-batches", broker="kafka://127.0.0.1:1")
    transport = Transport(app.conf.broker[0], app)

    async def nothing(*args: Any) -> None:
        return None

    consumer = LeanConsumer(
        transport,
        callback=nothing,
        on_partitions_revoked=nothing,
        on_partitions_assigned=nothing,
    )
    app.topics.acking_topics.add("quotes")
    app.flow_control.resume()  # as after a recovery: streams take events
    yield consumer


def test_a_batch_has_its_last_record_s_coordinates_and_its_records_as_value() -> None:
    tp = TP("quotes", 2)
    records = [kafka_record(o, 2) for o in (5, 6, 9)]
    batch = RecordBatch.of(tp, records, 7)
    assert (batch.topic, batch.partition, batch.offset, batch.tp) == ("quotes", 2, 9, tp)
    assert batch.value is records
    assert batch.timestamp == 1.0  # seconds, as Faust's messages
    assert batch.generation_id == 7


def delivered(consumer: LeanConsumer, tp: TP, offsets: list[int]) -> RecordBatch:
    """A batch as the delivery loop hands it out."""
    records = [kafka_record(o, tp.partition) for o in offsets]
    consumer.batch_delivered(tp, records)
    return RecordBatch.of(tp, records)


def test_acknowledging_a_batch_makes_each_of_its_offsets_committable(
    consumer: LeanConsumer,
) -> None:
    tp = TP("quotes", 0)
    consumer._committed_offset[tp] = 10
    first = delivered(consumer, tp, [10, 11, 12])
    second = delivered(consumer, tp, [13, 14, 15])
    # A stream acknowledges the batch's message: its one (last) offset, as Faust's compiled
    # iterator does inline.
    assert consumer.ack(second) is True
    assert consumer._acked[tp] == [15]
    # Offsets 13..15 are done, 10..12 are not: nothing may be committed yet.
    assert consumer._new_offset(tp) is None
    assert consumer.ack(first) is True
    assert consumer._new_offset(tp) == 16
    assert consumer.ack(first) is False  # twice is once
    assert not consumer._batch_offsets[tp]


def test_commits_follow_batch_after_batch(consumer: LeanConsumer) -> None:
    """The live case: batches acknowledged one after the other, a commit between them."""
    tp = TP("quotes", 0)
    consumer._committed_offset[tp] = 0
    offset = 0
    for size in (1, 5, 2, 40, 1, 7):
        batch = delivered(consumer, tp, list(range(offset, offset + size)))
        offset += size
        consumer.ack(batch)
        new = consumer._new_offset(tp)
        assert new == offset
        consumer._committed_offset[tp] = new  # what Faust's commit then records
    assert not consumer._batch_offsets[tp] and not consumer._acked[tp]


def test_a_batch_with_holes_commits_through_the_known_gap(consumer: LeanConsumer) -> None:
    async def run() -> int | None:
        tp = TP("quotes", 0)
        consumer._committed_offset[tp] = 0
        # Offsets 2 and 3 are transaction markers: the delivery loop records them as a gap.
        await consumer._add_gap(tp, 2, 3)
        consumer.ack(delivered(consumer, tp, [0, 1, 4, 5]))
        return consumer._new_offset(tp)

    assert asyncio.run(run()) == 6


def test_batches_of_revoked_partitions_are_forgotten(consumer: LeanConsumer) -> None:
    tp = TP("quotes", 0)
    delivered(consumer, tp, [0, 1, 2])

    async def revoke() -> None:
        await consumer.on_partitions_revoked({tp})

    # Faust's own part needs a started app; ours runs before it.
    with contextlib.suppress(Exception):
        asyncio.run(revoke())
    assert tp not in consumer._batch_offsets


def test_a_skipped_batch_below_the_committed_offset_is_dropped(consumer: LeanConsumer) -> None:
    tp = TP("quotes", 0)
    delivered(consumer, tp, [0, 1, 2])  # never acknowledged (a stale generation)
    consumer._committed_offset[tp] = 3  # the partition came back, committed past it
    consumer.ack(delivered(consumer, tp, [3, 4]))
    assert consumer._new_offset(tp) == 5
    assert not consumer._batch_offsets[tp]


def test_a_single_record_is_acknowledged_as_faust_does(consumer: LeanConsumer) -> None:
    tp = TP("quotes", 1)
    assert consumer.ack(record(0, 1)) is True
    assert consumer._new_offset(tp) == 1


async def test_a_batched_topic_hands_the_records_over_undecoded() -> None:
    app = faust.App("unit-batches-decode", broker="kafka://127.0.0.1:1")
    topic = BatchedTopic(app, topics=["quotes"])
    records = [kafka_record(0), kafka_record(1)]
    event = await topic.decode(RecordBatch.of(TP("quotes", 0), records))
    assert event.value is records and event.key is None
    assert topic.maxsize == BATCH_BUFFER_SIZE
    assert isinstance(topic.clone(is_iterator=True), BatchedTopic)


def test_a_topic_is_batched_only_when_all_its_subscribers_are() -> None:
    app = faust.App("unit-batches-kinds", broker="kafka://127.0.0.1:1")
    batched, plain = BatchedTopic(app, topics=["quotes"]), app.topic("quotes")
    assert is_batched([batched]) is True
    assert is_batched([plain]) is False
    assert is_batched([]) is False
    with pytest.raises(TypeError, match="both batched and per-record"):
        is_batched([batched, plain])


async def test_a_fetch_goes_out_as_one_batch_from_the_read_offset_with_skipped_offsets_done(
    consumer: LeanConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tp = TP("quotes", 0)
    delivered: list[RecordBatch] = []
    gaps: list[tuple[int, int]] = []

    async def take(message: RecordBatch) -> None:
        delivered.append(message)

    async def add_gap(tp: TP, first: int, last: int) -> None:
        gaps.append((first, last))

    monkeypatch.setattr(consumer, "callback", take)
    monkeypatch.setattr(consumer, "_add_gap", add_gap)
    consumer.resume_flow()
    generation = consumer.app.consumer_generation_id
    # The read offset is the next one to deliver, as Faust's loop reads it (`offset >=`).
    consumer._read_offset[tp] = 4
    # 3 was delivered before; 6 and 9-10 are transaction markers (no record).
    records = [kafka_record(o) for o in (3, 4, 5, 7, 8, 11)]
    await consumer._deliver_batches({tp: records}, generation)
    [batch] = delivered
    assert [r.offset for r in batch.value] == [4, 5, 7, 8, 11]
    assert batch.offset == 11 and batch.generation_id == generation
    assert gaps == [(6, 7), (9, 11)]  # Faust's _add_gap takes (first, next record's offset)
    assert consumer._read_offset[tp] == 11
    # Read up to 11: only 11 itself would go again, as in Faust's loop.
    await consumer._deliver_batches({tp: records[:-1]}, generation)
    assert len(delivered) == 1


async def test_a_fetch_from_before_a_rebalance_is_not_delivered(
    consumer: LeanConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered: list[Any] = []

    async def take(message: Any) -> None:
        delivered.append(message)

    monkeypatch.setattr(consumer, "callback", take)
    consumer.resume_flow()
    stale = consumer.app.consumer_generation_id - 1
    tp = TP("quotes", 0)
    await consumer._deliver_batches({tp: [kafka_record(0)]}, stale)
    await consumer._deliver_records({TP("other", 0): [kafka_record(0, topic="other")]}, stale)
    assert delivered == []
    assert consumer._read_offset[tp] is None


async def test_a_rebalance_during_the_commit_before_a_batch_leaves_its_seek_in_place(
    consumer: LeanConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit every `commit_every` acknowledgements awaits the broker; a rebalance then
    seeks the partition back to its committed offset. The fetched batch must be dropped and
    the seek's read offset kept: overwriting it skipped the batch when it was re-fetched (the
    first batch of a fresh partition, a hole the agent cannot see)."""
    tp = TP("quotes", 0)
    delivered: list[Any] = []

    async def take(message: Any) -> None:
        delivered.append(message)

    async def commit_during_a_rebalance() -> bool:
        consumer.app.consumer_generation_id += 1
        consumer._read_offset[tp] = 0  # the rebalance's seek
        return True

    monkeypatch.setattr(consumer, "callback", take)
    monkeypatch.setattr(consumer, "commit", commit_during_a_rebalance)
    monkeypatch.setattr(consumer, "_commit_every", 1)
    consumer._n_acked = 1
    consumer.resume_flow()
    generation = consumer.app.consumer_generation_id
    await consumer._deliver_batches({tp: [kafka_record(o) for o in range(5)]}, generation)
    assert delivered == []
    assert consumer._read_offset[tp] == 0


@pytest.mark.parametrize("held_by", ["a recovery's resumed partitions", "flow control"])
async def test_a_fetch_made_while_streams_are_held_waits_for_them_and_the_recovery_s_seek(
    consumer: LeanConsumer, monkeypatch: pytest.MonkeyPatch, held_by: str
) -> None:
    """A recovery resumes the stream partitions and awaits their seek before it resumes flow
    control, which empties every stream's queue; a stream also drops what it takes while flow
    control is suspended. A fetch made meanwhile must wait: delivered at once, the quotes of a
    restored worker's partitions were lost (tests/integration/test_state_upgrade.py)."""
    tp, other, changelog = TP("quotes", 0), TP("other", 0), TP("app-window-changelog", 0)
    delivered: list[Any] = []

    async def take(message: Any) -> None:
        delivered.append(message)

    monkeypatch.setattr(consumer, "callback", take)
    monkeypatch.setattr(consumer, "_is_changelog_tp", lambda tp: tp.topic == changelog.topic)
    consumer.resume_flow()
    if held_by == "flow control":
        consumer.app.flow_control.suspend()
    else:
        consumer.resume_partitions({changelog})  # the changelogs' recovery: nothing held
        assert consumer.streams_take_events()
        consumer.resume_partitions({tp, other})
    assert not consumer.streams_take_events()
    generation = consumer.app.consumer_generation_id
    batches = asyncio.ensure_future(
        consumer._deliver_batches({tp: [kafka_record(o) for o in range(10, 15)]}, generation)
    )
    records = asyncio.ensure_future(
        consumer._deliver_records(
            {
                changelog: [kafka_record(3, topic=changelog.topic)],
                other: [kafka_record(7, topic="other")],
            },
            generation,
        )
    )
    for _ in range(5):
        await asyncio.sleep(0.02)
    # The recovery reads its changelog while streams are held; nothing else went out.
    assert [m.topic for m in delivered] == [changelog.topic]
    consumer._read_offset[tp] = 12  # the recovery's seek: the committed offset
    consumer.app.flow_control.resume()
    consumer.resume_flow()
    await asyncio.wait_for(asyncio.gather(batches, records), 5)
    batch = next(m for m in delivered if isinstance(m, RecordBatch))
    assert [r.offset for r in batch.value] == [12, 13, 14]
    assert [(m.topic, m.offset) for m in delivered if not isinstance(m, RecordBatch)] == [
        (changelog.topic, 3),
        ("other", 7),
    ]


async def test_a_fetch_held_for_the_streams_is_dropped_when_a_rebalance_comes_first(
    consumer: LeanConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tp = TP("quotes", 0)
    delivered: list[Any] = []

    async def take(message: Any) -> None:
        delivered.append(message)

    monkeypatch.setattr(consumer, "callback", take)
    consumer.resume_flow()
    consumer.resume_partitions({tp})
    generation = consumer.app.consumer_generation_id
    held = asyncio.ensure_future(consumer._deliver_batches({tp: [kafka_record(0)]}, generation))
    await asyncio.sleep(0.02)
    consumer.app.consumer_generation_id += 1
    await asyncio.wait_for(held, 5)
    consumer.resume_flow()
    assert delivered == []
    assert consumer._read_offset[tp] is None
