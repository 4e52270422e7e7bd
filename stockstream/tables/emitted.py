"""What each source partition has already emitted, so a restarted worker emits nothing twice.

Emitting a window and recording the close in the changelog cannot be one atomic step without
Kafka transactions, so after a crash a window may be closed again. Output partition p only
receives windows of source partition p, oldest first per symbol, so the newest window start
per symbol found in the output partition after the last checkpointed output offset tells
exactly which re-closed windows are already out there. The agent reads that part of the output
partition back (kafka/readback.py) and hands the records to `EmittedIndex.recover`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import orjson

from stockstream.contracts.windows import WindowRecordError, window_identity
from stockstream.tables.windows import WindowAggregate

log = logging.getLogger(__name__)


class EmittedIndex:
    """Per source partition: the newest window start per symbol already in the output topic."""

    def __init__(self) -> None:
        self._newest: dict[int, dict[str, int]] = {}

    def recover(
        self, topic: str, partition: int, records: Iterable[tuple[int, bytes | None]]
    ) -> None:
        """Index the (offset, value) records read back from output `partition`."""
        newest: dict[str, int] = {}
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
            if start_ms > newest.get(symbol, -1):
                newest[symbol] = start_ms
        self._newest[partition] = newest

    def emitted(self, partition: int, window: WindowAggregate) -> bool:
        return window.start_ms <= self._newest.get(partition, {}).get(window.symbol, -1)

    def mark(self, partition: int, window: WindowAggregate) -> None:
        self._newest.setdefault(partition, {})[window.symbol] = window.start_ms

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._newest.pop(partition, None)
