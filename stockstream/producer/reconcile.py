"""Finding in the topic the spooled records an earlier session may have delivered.

No duplicates from the spool. A record that was not acknowledged may still have been written:
the broker appended it but the answer was lost (a broker stopped with SIGTERM appends the
requests it already read and closes the connections without answering). Re-sending it blindly
would duplicate it. So such records are "in doubt" and are reconciled before anything is
re-sent: the producer remembers, per partition, the offset after its last acknowledged record
(or the end offset when the session started) -- an in-doubt record that reached the topic can
only be at or after it, and in send order (one idempotent session keeps per-partition order
and has no gaps). The next session, before sending anything, reads each affected partition
from that offset to its current end and matches the in-doubt records in order by key and
value bytes; the ones found are acknowledged without being sent again
(`stockstream_producer_reconciled_total`), the others are re-sent. The baseline lives in the
spool state (`sent_upto`: the highest spool sequence number that may have been handed to a
session, written *before* handing records out; `floors`: the per-partition offsets), so this
also works across a crash or restart.

What remains at-least-once, precisely:
- a produce request still queued inside a *live* broker when the next session reads the
  partitions (the old session's connections are closed first, but a broker that is alive and
  slower than the delivery timeout may still append a request it read earlier);
- another producer writing byte-identical records (same key and JSON value) to the same
  partition in the reconciled range -- such a record is taken for ours;
- a partition count change between the failed send and the reconciliation, and keyless records
  (neither can be located, so they are re-sent).

This module only reads (the spool and the topic); the producer acknowledges what was found.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from stockstream.producer.session import Session, partition_for
from stockstream.producer.spool import Spool
from stockstream.producer.spool_format import SpoolRecord


class Found(NamedTuple):
    """A spooled record found in the topic."""

    record: SpoolRecord
    partition: int
    offset: int


class Reconciliation(NamedTuple):
    in_doubt: int  # spooled records that may have been delivered
    found: list[Found]  # those that were, in topic order per partition


async def find_delivered(
    spool: Spool, session: Session, topic: str, delivery_timeout: float
) -> Reconciliation | None:
    """Read, with the session's consumer, the partitions where in-doubt records can be, and
    match them; None when nothing is in doubt."""
    assert session.consumer is not None
    floors = spool.meta.get("floors")
    upto = int(spool.meta.get("sent_upto", 0))
    if not isinstance(floors, dict) or upto <= spool.acked_through:
        return None
    doubt = spool.scan(upto)
    if not doubt:
        return None
    by_partition: dict[int, list[SpoolRecord]] = {}
    for record in doubt:
        p = partition_for(record.key, session.partitions)
        if p is not None:
            by_partition.setdefault(p, []).append(record)
    consumer = session.consumer
    tps = {p: TopicPartition(topic, p) for p in by_partition}
    consumer.assign(list(tps.values()))
    for p, tp in tps.items():
        start = floors.get(str(p))
        if start is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, int(start))
    matched = dict.fromkeys(by_partition, 0)
    found: list[Found] = []
    open_tps = set(tps)
    deadline = time.monotonic() + max(30.0, 3 * delivery_timeout)
    while open_tps:
        for p in list(open_tps):
            end = session.end_offsets.get(p, 0)
            if matched[p] >= len(by_partition[p]) or await consumer.position(tps[p]) >= end:
                open_tps.discard(p)
        if not open_tps:
            break
        if time.monotonic() > deadline:
            raise KafkaTimeoutError("reconciliation did not finish reading the partitions")
        batches = await consumer.getmany(*(tps[p] for p in open_tps), timeout_ms=200)
        for tp, messages in batches.items():
            p = tp.partition
            wanted = by_partition[p]
            end = session.end_offsets.get(p, 0)
            for message in messages:
                if message.offset >= end or matched[p] >= len(wanted):
                    break
                record = wanted[matched[p]]
                if message.key == record.key and message.value == record.value:
                    found.append(Found(record, p, message.offset))
                    matched[p] += 1
    return Reconciliation(len(doubt), found)
