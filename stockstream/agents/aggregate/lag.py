"""How far the aggregation agent is behind its input, per owned partition.

`stockstream_consumer_lag_records{topic,partition}`: the partition's high watermark (as the
consumer last fetched it) minus the next offset to process. `stockstream_consumer_lag_seconds`:
while records are waiting, the age of the last processed record by its Kafka timestamp (an
upper bound of the waiting records' age, known without reading them); 0 when caught up.

Measured by a timer, not per record: a stalled agent processes nothing, and that is when the
gauges matter most. A revoked partition's series are removed, so a partition that moved to
another worker is not reported twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from stockstream.metrics import CONSUMER_LAG_RECORDS, CONSUMER_LAG_SECONDS

#: (partition) -> the consumer's high watermark, None while unknown.
HighWater = Callable[[int], int | None]


def record_seconds(timestamp: float | int | None) -> float | None:
    """A record's timestamp in epoch seconds: Faust messages carry seconds, aiokafka records
    milliseconds; None (or negative: no timestamp) stays None."""
    if timestamp is None or timestamp < 0:
        return None
    return timestamp / 1000 if timestamp > 100_000_000_000 else float(timestamp)


class ConsumerLag:
    def __init__(
        self, topic: str, high_water: HighWater, clock: Callable[[], float] = time.time
    ) -> None:
        self._topic = topic
        self._high_water = high_water
        self._clock = clock
        self._next: dict[int, int] = {}  # partition -> next offset to process
        self._last_seen: dict[int, float] = {}  # partition -> timestamp of the last record

    def processed(self, partition: int, offset: int, timestamp: float | int | None) -> None:
        if offset >= self._next.get(partition, 0):
            self._next[partition] = offset + 1
            seconds = record_seconds(timestamp)
            if seconds is not None:
                self._last_seen[partition] = seconds

    def measure(self, partitions: set[int]) -> dict[int, tuple[int, float]]:
        """Update the gauges of the owned `partitions`; returns {partition: (records, s)}."""
        now = self._clock()
        out: dict[int, tuple[int, float]] = {}
        for partition in sorted(partitions):
            high = self._high_water(partition)
            if high is None or partition not in self._next:
                continue
            records = max(0, high - self._next[partition])
            last = self._last_seen.get(partition)
            seconds = max(0.0, now - last) if records and last is not None else 0.0
            labels = (self._topic, str(partition))
            CONSUMER_LAG_RECORDS.labels(*labels).set(records)
            CONSUMER_LAG_SECONDS.labels(*labels).set(seconds)
            out[partition] = (records, seconds)
        return out

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._next.pop(partition, None)
            self._last_seen.pop(partition, None)
            for gauge in (CONSUMER_LAG_RECORDS, CONSUMER_LAG_SECONDS):
                with contextlib.suppress(KeyError):
                    gauge.remove(self._topic, str(partition))
