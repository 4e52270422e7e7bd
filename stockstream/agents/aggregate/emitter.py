"""Writing closed windows to `stock-quotes-aggregated`, each exactly once.

Output partition p receives only the windows of source partition p. Before a partition is
used, the part of its output partition written after the last checkpointed output offset is
read back (kafka/readback.py): the windows found there were emitted before a crash and are not
sent again (tables/emitted.py). A send that fails may still have reached the broker (its answer
was lost), so after a failed send the same read-back decides what is sent again. Read-backs are
retried while the broker is away: nothing of the partition is emitted before they succeed. The
worker's producer is idempotent (kafka/faust_transport.py), so the client's own retries of a
batch cannot write it twice either.

If some windows of one close fail and others succeed, the re-sent ones can follow a later
window of the same symbol in the output: never lost, never twice, but then out of start order
(logged). It needs a partial failure inside one close; a whole batch failing, the usual case,
keeps the order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container, Sequence
from typing import Any

import faust
import orjson

from stockstream.kafka.readback import ReadAfter
from stockstream.metrics import EMIT_FAILURES
from stockstream.retry import Backoff, retry
from stockstream.settings import KafkaSettings
from stockstream.tables.emitted import EmittedIndex
from stockstream.tables.windows import WindowAggregate

log = logging.getLogger(__name__)

# While the broker is unreachable, sends and read-backs are retried with this backoff
# (back-pressure: the source offsets are not committed meanwhile, so nothing is lost).
BACKOFF = Backoff(initial_seconds=0.5, max_seconds=30.0)

#: Told about every close once its windows are in the output topic: (source partition, the
#: closed windows, the highest output offset known). Registered by outer layers (the web view
#: keeps recently closed windows with it), so this stage imports none of them.
EmitListener = Callable[[int, Sequence[WindowAggregate], int], None]


class WindowEmitter:
    def __init__(self, kafka: KafkaSettings, output: faust.TopicT, read_back: ReadAfter) -> None:
        self._kafka = kafka
        self._output = output
        self._read_back = read_back
        self.index = EmittedIndex()
        self.listeners: list[EmitListener] = []

    async def load(self, partition: int, checkpoint: int) -> None:
        """Learn what `partition` emitted after output offset `checkpoint`."""
        self.index.forget([partition])
        await self._recover(partition, checkpoint)

    async def emit(
        self, partition: int, checkpoint: int, windows: list[WindowAggregate]
    ) -> tuple[int, int]:
        """Write the windows not in the output yet; returns (how many were written, the
        highest output offset this call's sends got, at least `checkpoint`). Windows found by
        a read-back after a failed send are in the index with their offsets."""
        todo = [w for w in windows if not self.index.emitted(partition, w)]
        written = len(todo)
        highest, failures = checkpoint, 0
        while todo:
            results = await asyncio.gather(
                *(self._send(w, partition) for w in todo), return_exceptions=True
            )
            failed: list[tuple[WindowAggregate, BaseException]] = []
            for window, result in zip(todo, results, strict=True):
                if isinstance(result, BaseException):
                    failed.append((window, result))
                else:
                    highest = max(highest, result.offset)
                    self.index.mark(partition, window, result.offset)
            if not failed:
                break
            EMIT_FAILURES.inc(len(failed))
            pause = BACKOFF.delay(failures)
            failures += 1
            log.error(
                "emit failed; checking the output partition before sending again",
                extra={
                    "partition": partition,
                    "windows": len(failed),
                    "symbol": failed[0][0].symbol,
                    "attempt": failures,
                    "retry_in_s": round(pause, 3),
                    "error": repr(failed[0][1]),
                },
            )
            await asyncio.sleep(pause)
            await self._recover(partition, checkpoint)
            if len(failed) < len(todo):
                log.warning(
                    "windows of one close partly failed: the ones sent again may follow later"
                    " windows of their symbol in the output",
                    extra={"partition": partition, "failed": len(failed), "sent": len(todo)},
                )
            todo = [w for w, _ in failed if not self.index.emitted(partition, w)]
        self._notify(partition, windows, highest)
        return written, highest

    def _notify(self, partition: int, windows: list[WindowAggregate], highest: int) -> None:
        for listener in self.listeners:
            try:
                listener(partition, windows, highest)
            except Exception:
                # An observer's bug must never stop emitting.
                log.exception("emit listener failed", extra={"partition": partition})

    def checkpointed(
        self,
        partition: int,
        closed: list[WindowAggregate],
        still_open: Container[Any],
        checkpoint: int,
        written: int,
    ) -> int:
        """The output offset a checkpoint of `closed` records (`EmittedIndex.checkpointed`)."""
        return self.index.checkpointed(partition, closed, still_open, checkpoint, written)

    def forget(self, partitions: set[int]) -> None:
        self.index.forget(partitions)

    async def _send(self, window: WindowAggregate, partition: int) -> Any:
        delivery = await self._output.send(
            key=window.symbol.encode(),
            value=orjson.dumps(window.to_record()),
            partition=partition,
            # No event-time record timestamp: the broker's time-based retention would delete
            # the windows of a replay (old event times) at once. Event time is in the payload.
        )
        return await delivery

    async def _recover(self, partition: int, after: int) -> None:
        topic = self._kafka.aggregated_topic

        async def read() -> tuple[list[tuple[int, bytes | None]], int]:
            return await self._read_back(self._kafka, topic, partition, after)

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            log.error(
                "cannot read back the output partition, retrying",
                extra={
                    "topic": topic,
                    "partition": partition,
                    "offset": after,
                    "attempt": retries,
                    "retry_in_s": round(pause, 3),
                    "error": repr(exc),
                },
            )

        records, _ = await retry(read, BACKOFF, what="read back", on_failure=failed)
        self.index.recover(topic, partition, records)
