"""Writing anomalies to `stock-anomalies`, each exactly once, the way the aggregation writes
windows (agents/aggregate/emitter.py, tables/emitted.py).

Output partition p receives only anomalies of input partition p. Sending an anomaly and
recording the fold of its window in the changelog cannot be one atomic step without Kafka
transactions, so a window may be judged again after a crash (its fold was lost), and a send
that failed may still have reached the broker. An anomaly can only be judged again while its
window is not folded in the stored history, and the progress record's output checkpoint never
passes an anomaly whose window is not folded: so the anomalies found in the output partition
after the checkpoint are exactly the ones not to send again. They are read back
(kafka/readback.py) when a partition is loaded and after a failed send; read-backs and sends
are retried while the broker is away. The worker's producer is idempotent
(kafka/faust_transport.py), so the client's own retries cannot write a record twice either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import faust
import orjson

from stockstream.contracts.anomalies import AnomalyRecordError, anomaly_identity, parse_anomaly
from stockstream.kafka.readback import ReadAfter
from stockstream.metrics import ANOMALIES
from stockstream.retry import Backoff, retry
from stockstream.settings import KafkaSettings

log = logging.getLogger(__name__)

BACKOFF = Backoff(initial_seconds=0.5, max_seconds=30.0)

Identity = tuple[str, int, str]  # (symbol, window_start_ms, kind)
#: symbol -> start of its last window folded (None: none yet).
FoldedUntil = Callable[[str], int | None]


class EmittedAnomalies:
    """Per input partition: the anomalies in the output partition whose windows may still be
    judged, with their output offsets."""

    def __init__(self) -> None:
        self._present: dict[int, dict[Identity, int]] = {}

    def recover(
        self, topic: str, partition: int, records: Iterable[tuple[int, bytes | None]]
    ) -> int:
        present = self._present.setdefault(partition, {})
        found = 0
        for offset, value in records:
            if value is None:
                continue
            try:
                identity = anomaly_identity(parse_anomaly(orjson.loads(value)))
            except (orjson.JSONDecodeError, AnomalyRecordError):
                # Not ours (written by hand?): it cannot be an anomaly we emitted.
                log.warning(
                    "skipping a non-anomaly record in the output topic",
                    extra={"topic": topic, "partition": partition, "offset": offset},
                )
                continue
            present[identity] = offset
            found += 1
        return found

    def emitted(self, partition: int, identity: Identity) -> bool:
        present = self._present.get(partition)
        return present is not None and identity in present

    def mark(self, partition: int, identity: Identity, offset: int) -> None:
        self._present.setdefault(partition, {})[identity] = offset

    def checkpointed(self, partition: int, checkpoint: int, folded_until: FoldedUntil) -> int:
        """The histories are about to be stored as `folded_until` tells: anomalies of windows
        folded can never be judged again, so they leave the index. Returns the output offset
        the progress records: past every anomaly that left, never past one that stays (a
        second crash must still find it), at least `checkpoint`."""
        present = self._present.get(partition, {})
        reached = checkpoint
        for identity, offset in list(present.items()):
            symbol, start_ms, _ = identity
            until = folded_until(symbol)
            if until is not None and start_ms <= until:
                del present[identity]
                reached = max(reached, offset)
        if present:
            reached = min(reached, min(present.values()) - 1)
        return max(checkpoint, reached)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._present.pop(partition, None)


class AnomalyEmitter:
    def __init__(self, kafka: KafkaSettings, output: faust.TopicT, read_back: ReadAfter) -> None:
        self._kafka = kafka
        self._output = output
        self._read_back = read_back
        self.index = EmittedAnomalies()

    async def load(self, partition: int, checkpoint: int) -> None:
        """Learn what `partition` emitted after output offset `checkpoint`."""
        self.index.forget([partition])
        await self._recover(partition, checkpoint)

    async def emit(
        self, partition: int, checkpoint: int, anomalies: list[tuple[Identity, dict[str, Any]]]
    ) -> int:
        """Write the (identity, record) anomalies not in the output yet and wait for the
        broker's acknowledgements; returns how many this call wrote."""
        todo = [(i, r) for i, r in anomalies if not self.index.emitted(partition, i)]
        written, failures = 0, 0
        while todo:
            results = await asyncio.gather(
                *(self._send(r, partition) for _, r in todo), return_exceptions=True
            )
            failed: list[tuple[Identity, dict[str, Any]]] = []
            error: BaseException | None = None
            for (identity, record), result in zip(todo, results, strict=True):
                if isinstance(result, BaseException):
                    failed.append((identity, record))
                    error = result
                else:
                    self.index.mark(partition, identity, result.offset)
                    ANOMALIES.labels(identity[2]).inc()
                    written += 1
                    log.info(
                        "anomaly emitted",
                        extra={
                            "symbol": identity[0],
                            "window_start_ms": identity[1],
                            "kind": identity[2],
                            "z": record["z"],
                            "topic": self._kafka.anomalies_topic,
                            "partition": partition,
                            "offset": result.offset,
                        },
                    )
            if not failed:
                break
            pause = BACKOFF.delay(failures)
            failures += 1
            log.error(
                "anomaly emit failed; checking the output partition before sending again",
                extra={
                    "partition": partition,
                    "anomalies": len(failed),
                    "symbol": failed[0][0][0],
                    "attempt": failures,
                    "retry_in_s": round(pause, 3),
                    "error": repr(error),
                },
            )
            await asyncio.sleep(pause)
            await self._recover(partition, checkpoint)
            todo = [(i, r) for i, r in failed if not self.index.emitted(partition, i)]
        return written

    def forget(self, partitions: Iterable[int]) -> None:
        self.index.forget(partitions)

    async def _send(self, record: dict[str, Any], partition: int) -> Any:
        delivery = await self._output.send(
            key=record["symbol"].encode(),
            value=orjson.dumps(record),
            partition=partition,
            # No event-time record timestamp: retention would delete a replay's anomalies.
        )
        return await delivery

    async def _recover(self, partition: int, after: int) -> None:
        topic = self._kafka.anomalies_topic

        async def read() -> tuple[list[tuple[int, bytes | None]], int]:
            return await self._read_back(self._kafka, topic, partition, after)

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            log.error(
                "cannot read back the anomalies partition, retrying",
                extra={
                    "topic": topic,
                    "partition": partition,
                    "offset": after,
                    "attempt": retries,
                    "retry_in_s": round(pause, 3),
                    "error": repr(exc),
                },
            )

        records, _ = await retry(read, BACKOFF, what="read back anomalies", on_failure=failed)
        self.index.recover(topic, partition, records)
