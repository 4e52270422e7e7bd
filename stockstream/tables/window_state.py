"""The changelog-backed window table (`define_table`) and its write-through mirror
(`WindowState`), per source partition.

The Faust table is the durable state (its changelog restores a restarted or rebalanced
worker). Reads go to the in-memory `PartitionWindows` so the hot path never deserialises.
Key layout, all in the changelog partition of the source partition they belong to:
    w|<partition>|<symbol>|<window start ms>  -> a WindowAggregate (state_codec.py)
    c|<partition>                             -> a PartitionClock (state_codec.py)
Writes are ordered within a changelog partition, so a crash leaves a prefix of them: window
writes come before the clock checkpoint that follows a close, which is what makes redeliveries
idempotent (see tables/windows.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import faust

from stockstream.metrics import STATE_UNREADABLE
from stockstream.tables.state_codec import (
    StateFormatError,
    decode_clock,
    decode_window,
    encode_clock,
    encode_window,
)
from stockstream.tables.windows import PartitionWindows, WindowAggregate

log = logging.getLogger(__name__)


TABLE_NAME = "window-state"


def define_table(app: faust.App, partitions: int) -> Any:
    """The window table on `app` (its changelog topic is `<app id>-window-state-changelog`)."""
    return app.Table(
        TABLE_NAME,
        default=None,
        partitions=partitions,
        schema=faust.Schema(key_serializer="json", value_serializer="json"),
        # A worker that takes a partition over replays its changelog from the start, so the
        # changelog's size is the rebalance pause of a joining worker (about 5,000 records/s).
        # Every batch rewrites its windows and every close deletes them, while the live state is
        # a few thousand keys: compaction can only clean closed segments, so they are closed
        # every 10 s (10-minute segments let ten minutes of rewrites pile up: 15 s of restore
        # after one live minute in benchmarks/live_pipeline.py). Tombstones of closed windows
        # go after 10 minutes instead of Kafka's day (720,000 of them for 500 symbols); a
        # reader that misses one restores a window its clock shows as closed, which
        # `WindowState.restore` skips.
        extra_topic_configs={
            "segment.ms": "10000",
            "min.cleanable.dirty.ratio": "0.1",
            "delete.retention.ms": "600000",
        },
        # With RocksDB: its default three 64 MiB write buffers fill with every overwrite of a
        # window before a flush frees them, and the worker's RSS saw-toothed by 150 MB at 2,000
        # quotes/s (benchmarks/live_pipeline.py); the live table is a few hundred KB.
        options={"write_buffer_size": 8 << 20, "max_write_buffer_number": 2},
        help="Open one-minute windows (w|partition|symbol|start), partition clocks (c|partition)",
    )


def window_key(partition: int, window: WindowAggregate) -> str:
    return f"w|{partition}|{window.symbol}|{window.start_ms}"


def clock_key(partition: int) -> str:
    return f"c|{partition}"


class WindowState:
    def __init__(
        self,
        table: MutableMapping[str, Any],
        size_ms: int,
        grace_ms: int,
        quorum: int = 1,
        excluded_conditions: frozenset[str] = frozenset(),
    ) -> None:
        self._table = table
        self._size_ms = size_ms
        self._grace_ms = grace_ms
        self._quorum = quorum
        self._excluded = excluded_conditions
        self._partitions: dict[int, PartitionWindows] = {}
        # Windows changed since they were last written, per partition (write-behind per batch).
        self._dirty: dict[int, dict[tuple[str, int], WindowAggregate]] = {}
        # Wall-clock time of the last quote (or of loading), for the idle rule.
        self.last_activity: dict[int, float] = {}
        # The last offset each partition's clock was written with.
        self._clock_written: dict[int, int] = {}

    def loaded(self) -> dict[int, PartitionWindows]:
        return self._partitions

    def get(self, partition: int) -> PartitionWindows | None:
        return self._partitions.get(partition)

    def restore(self, partition: int) -> PartitionWindows:
        """Rebuild the mirror of one partition from the (recovered) table, without using it
        yet (`register` does, once the caller has everything else the partition needs)."""
        windows = PartitionWindows(
            self._size_ms, self._grace_ms, quorum=self._quorum, excluded_conditions=self._excluded
        )
        key = clock_key(partition)
        clock = self._table.get(key)
        if clock is not None:
            try:
                windows.set_clock(decode_clock(clock))
            except StateFormatError as exc:
                # A fresh clock re-reads more of the output partition and re-applies records
                # the windows' own offsets then skip: slower, never wrong.
                self._unreadable(partition, key, exc)
        prefix = f"w|{partition}|"
        stale = 0
        for key, value in self._table.items():
            if value is None or not key.startswith(prefix):
                continue
            try:
                window = decode_window(value)
            except StateFormatError as exc:
                self._unreadable(partition, key, exc)
                continue
            # Every checkpoint closes all windows its watermark has passed, so a restored
            # window the restored clock already covers was closed before: never re-emit it.
            if windows.covers(window):
                stale += 1
                continue
            windows.restore(window)
        if stale:
            log.warning(
                "ignored restored windows the clock shows as closed",
                extra={"partition": partition, "windows": stale},
            )
        return windows

    @staticmethod
    def _unreadable(partition: int, key: str, exc: StateFormatError) -> None:
        STATE_UNREADABLE.inc()
        log.error(
            "window table value unreadable, skipped",
            extra={"partition": partition, "key": key, "error": str(exc)},
        )

    def register(self, partition: int, windows: PartitionWindows) -> None:
        """Use `windows` for `partition` from now on."""
        self._partitions[partition] = windows
        self.last_activity[partition] = time.monotonic()

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop mirrors of partitions this worker no longer owns (reloaded if they return)."""
        for partition in partitions:
            self._partitions.pop(partition, None)
            self.last_activity.pop(partition, None)
            self._dirty.pop(partition, None)
            self._clock_written.pop(partition, None)

    def mark_dirty(self, partition: int, window: WindowAggregate) -> None:
        self._dirty.setdefault(partition, {})[(window.symbol, window.start_ms)] = window

    def write_dirty(self, partition: int) -> None:
        """Write every changed window of `partition` (the caller provides its stream context).

        One write per window per batch instead of one per quote; a window written later than
        the quotes it holds is safe because the source offsets are acknowledged only after the
        batch, i.e. after these writes."""
        for window in self._dirty.pop(partition, {}).values():
            self._table[window_key(partition, window)] = encode_window(window)

    def write_batch(self, partition: int) -> None:
        """The end of a batch: its changed windows, then the partition's clock if the batch
        moved it (windows first, as in `checkpoint`). A worker that loads the partition then
        resumes right after this batch; with the clock written only at closes it re-read every
        quote since the last close first (up to a minute of them: the bulk of a rebalance's
        pause once the changelog restore was fast, benchmarks/live_pipeline.py scale)."""
        self.write_dirty(partition)
        windows = self._partitions.get(partition)
        if windows is not None and self._clock_written.get(partition) != windows.clock.last_offset:
            self._write_clock(partition, windows)

    def _write_clock(self, partition: int, windows: PartitionWindows) -> None:
        self._table[clock_key(partition)] = encode_clock(windows.clock)
        self._clock_written[partition] = windows.clock.last_offset

    def checkpoint(self, partition: int, closed: list[WindowAggregate]) -> None:
        """Persist a close: remove the windows, then record the clock that covers it."""
        windows = self._partitions[partition]
        dirty = self._dirty.get(partition, {})
        for window in closed:
            # Deleted right away: writing its last state first would only grow the changelog.
            dirty.pop((window.symbol, window.start_ms), None)
        # Windows before the clock: a crash leaves a prefix, and the clock must never be
        # ahead of the windows it describes (tables/windows.py, idempotence).
        self.write_dirty(partition)
        for window in closed:
            key = window_key(partition, window)
            if key in self._table:
                del self._table[key]
        windows.remove(closed)
        self._write_clock(partition, windows)
