"""What each source partition has already emitted, so a restarted worker emits nothing twice.

Emitting a window and recording the close in the changelog cannot be one atomic step without
Kafka transactions, so after a crash a window may be closed again, and a send that failed may
still have reached the broker. Output partition p only receives windows of source partition p,
and a window can only be closed again while its close is not checkpointed, i.e. while its
record is after the checkpointed output offset. So the windows found in the output partition
after that offset are exactly the ones not to send again. The agent reads that part back
(kafka/readback.py) when it loads a partition and after a failed send, and hands the records to
`EmittedIndex.recover`. A read-back after a crash can hold the windows of several closes that
were emitted but not checkpointed: each checkpoint drops only the windows it closes, and never
records an output offset beyond a window that is still to be closed again.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from typing import Any

import orjson

from stockstream.contracts.windows import WindowRecordError, window_identity
from stockstream.tables.windows import WindowAggregate

log = logging.getLogger(__name__)


class EmittedIndex:
    """Per source partition: the windows in the output topic after its last checkpoint, with
    their output offsets."""

    def __init__(self) -> None:
        self._present: dict[int, dict[tuple[str, int], int]] = {}

    def recover(
        self, topic: str, partition: int, records: Iterable[tuple[int, bytes | None]]
    ) -> int:
        """Add the (offset, value) records read back from output `partition`; returns how
        many windows they held."""
        present = self._present.setdefault(partition, {})
        found = 0
        for offset, value in records:
            if value is None:
                continue
            try:
                symbol, start_ms = window_identity(orjson.loads(value))
            except (orjson.JSONDecodeError, WindowRecordError):
                # Not ours (written by hand?): it cannot be a window we emitted.
                log.warning(
                    "skipping a non-window record in the output topic",
                    extra={"topic": topic, "partition": partition, "offset": offset},
                )
                continue
            present[(symbol, start_ms)] = offset
            found += 1
        return found

    def emitted(self, partition: int, window: WindowAggregate) -> bool:
        present = self._present.get(partition)
        return present is not None and (window.symbol, window.start_ms) in present

    def mark(self, partition: int, window: WindowAggregate, offset: int) -> None:
        self._present.setdefault(partition, {})[(window.symbol, window.start_ms)] = offset

    def checkpointed(
        self,
        partition: int,
        closed: Iterable[WindowAggregate],
        still_open: Container[Any],
        checkpoint: int,
        written: int,
    ) -> int:
        """The `closed` windows' closes are being checkpointed: they can never close again, so
        they leave the index. Returns the output offset the checkpoint records: past the
        closed windows and what this close wrote (`written`), but never past a window read
        back after a crash that is still open, i.e. will be closed (and looked up here)
        again -- a second crash must still find it. At least `checkpoint`, the previous one."""
        present = self._present.get(partition, {})
        reached = written
        for window in closed:
            offset = present.pop((window.symbol, window.start_ms), None)
            if offset is not None:
                reached = max(reached, offset)
        pending = [offset for key, offset in present.items() if key in still_open]
        if pending:
            reached = min(reached, min(pending) - 1)
        return max(checkpoint, reached)

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._present.pop(partition, None)
