"""The producer's metric children for one topic (the metrics are declared in
stockstream/metrics.py).

What would be touched for every record in the hot path (`sent`, delivery latencies) is
accumulated by the producer and added here every few tens of milliseconds (a
`Histogram.observe` per record costs about as much as the rest of the producer's own
bookkeeping).
"""

from __future__ import annotations

from bisect import bisect_left

from stockstream.metrics import (
    PRODUCER_DELIVERY_SECONDS,
    PRODUCER_FAILED,
    PRODUCER_RECONCILED,
    PRODUCER_SENT,
    PRODUCER_SPOOL_DAMAGED,
    PRODUCER_SPOOL_PENDING,
    PRODUCER_SPOOLED,
    PRODUCER_SPOOLING,
)


class ProducerInstruments:
    """The metric children of one topic, resolved once (label lookups are not free)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.sent = PRODUCER_SENT.labels(topic)
        self.failed = {
            reason: PRODUCER_FAILED.labels(topic, reason)
            for reason in ("timeout", "error", "shutdown", "rejected", "spool_error")
        }
        self.spooled = {
            reason: PRODUCER_SPOOLED.labels(topic, reason) for reason in ("failed", "queued")
        }
        self.spool_pending = PRODUCER_SPOOL_PENDING.labels(topic)
        self.spooling = PRODUCER_SPOOLING.labels(topic)
        self.reconciled = PRODUCER_RECONCILED.labels(topic)
        self.spool_damaged = PRODUCER_SPOOL_DAMAGED.labels(topic)
        self.delivery_seconds = PRODUCER_DELIVERY_SECONDS.labels(topic)
        self._sent_published = 0

    def observe_deliveries(self, seconds: list[float]) -> None:
        """`delivery_seconds.observe` for many values at once: one increment per bucket
        touched instead of one per value (falls back to observe() if the client library's
        internals differ)."""
        if not seconds:
            return
        histogram = self.delivery_seconds
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        if not bounds or not buckets or total is None or len(bounds) != len(buckets):
            for value in seconds:
                histogram.observe(value)
            return
        counts = [0] * len(bounds)
        for value in seconds:
            counts[bisect_left(bounds, value)] += 1  # first bucket with value <= bound
        for bucket, count in zip(buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        total.inc(sum(seconds))

    def publish_sent(self, sent: int) -> None:
        """Bring the sent counter up to the producer's running total."""
        if sent > self._sent_published:
            self.sent.inc(sent - self._sent_published)
            self._sent_published = sent
