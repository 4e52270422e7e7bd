"""Delivery of a topic's records to a Faust agent one fetched batch per partition at a time.

Faust hands every record to its streams as an event of its own: per record the conductor
takes the flow-control lock, builds an event, queues it, and the stream takes it off the
queue, sets it as the current event, acknowledges it under a thread lock and calls its
sensors. For a minimal agent that was 80 % of its time (README.md, "Performance"), more than
a whole aggregation costs in Quix Streams. For a `BatchedTopic` the consumer
(kafka/faust_transport.py `LeanConsumer`) instead delivers all the records of one partition
that one fetch returned as one `RecordBatch`: one event whose value is the list of records,
in offset order, all of one partition. Everything Faust does per event still happens, once per
batch: flow control, the current event (so table changes go to the batch's changelog
partition), the generation check after a rebalance, and the acknowledgement, which marks every
record of the batch done only when the agent has finished the whole batch -- the offsets Faust
commits stay behind the agent's work, as with per-record events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faust
from faust.types import TP
from faust.types.tuples import ConsumerMessage

#: Batches a BatchedTopic's subscriber may have waiting. A batch is up to one fetch of a
#: partition (FAUST_CONSUMER_MAX_FETCH_SIZE, 1 MiB by default: ~4,000 quotes), and aiokafka
#: prefetches the next fetch meanwhile, so a few are enough to keep the agent busy; a full
#: buffer pauses the delivery loop, as Faust's 4,096-event buffer does. (Peak RSS of the
#: worker catching up on a backlog: 246 MB with 8, 215 MB with 2, benchmarks/.)
BATCH_BUFFER_SIZE = 4


class RecordBatch(ConsumerMessage):
    """The records of one partition from one fetch, as one Faust message: its coordinates
    are the last record's, its value the records (aiokafka consumer records, offset order:
    `topic`, `partition`, `offset`, `timestamp` in ms, `key`, `value`, ...)."""

    __slots__ = ()

    @classmethod
    def of(cls, tp: TP, records: Sequence[Any], generation_id: int = 0) -> RecordBatch:
        """`records`: aiokafka consumer records (timestamps in epoch milliseconds), of the
        consumer `generation_id` they were fetched in."""
        last = records[-1]
        return cls(
            tp.topic,
            tp.partition,
            last.offset,
            last.timestamp / 1000,  # a Faust message's is in seconds
            last.timestamp_type,
            [],
            None,
            records,  # type: ignore[arg-type]  # Faust types a message's value as bytes
            None,
            0,
            sum(record.serialized_value_size for record in records),
            tp,
            generation_id=generation_id,
        )


class BatchedTopic(faust.Topic):  # type: ignore[type-arg]  # Faust's Topic is generic
    """A topic whose subscribers receive `RecordBatch` events (see the module's doc).

    Its records are handed over undecoded: the agent parses them (it must dead-letter what
    does not parse, which Faust's per-record decoding would only log)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("maxsize", BATCH_BUFFER_SIZE)
        super().__init__(*args, **kwargs)

    def _compile_decode(self) -> None:
        create_event = self._create_event

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return create_event(None, message.value, message.headers, message)

        self.decode = decode  # type: ignore[method-assign]


def is_batched(channels: Any) -> bool:
    """Whether the records of a topic subscribed by `channels` go out in batches. Raises
    `TypeError` when a batched and a per-record subscriber share a topic: each would get
    events of a shape it cannot read."""
    kinds = {isinstance(channel, BatchedTopic) for channel in channels}
    if len(kinds) > 1:
        names = sorted({name for channel in channels for name in channel.topics})
        raise TypeError(f"topic(s) {names} have both batched and per-record subscribers")
    return kinds == {True}
