"""Prometheus metrics of the quote producer (stockstream/producer.py), on the process registry.

All carry a `topic` label. What would be touched for every record in the hot path (`sent`,
delivery latencies) is accumulated by the producer and added here every few tens of
milliseconds (a `Histogram.observe` per record costs about as much as the rest of the
producer's own bookkeeping).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

from stockstream.metrics import REGISTRY

SENT = Counter(
    "stockstream_producer_sent_total",
    "Records acknowledged by the broker (acks=all): sent directly, re-sent from the spool, or"
    " found already in the topic when reconciling an unacknowledged send",
    ["topic"],
    registry=REGISTRY,
)
FAILED = Counter(
    "stockstream_producer_failed_total",
    "Delivery attempts that failed, by reason: timeout (not acknowledged within"
    " PRODUCER_DELIVERY_TIMEOUT_SECONDS), error (send error), shutdown (still unacknowledged"
    " at close) -- these records go to the spool and are re-sent; rejected (refused by Kafka,"
    " e.g. too large) and spool_error (could not be spooled) -- these are lost",
    ["topic", "reason"],
    registry=REGISTRY,
)
SPOOLED = Counter(
    "stockstream_producer_spooled_total",
    "Records written to the local spool, by reason: failed (delivery failed), queued (the"
    " broker is unavailable or the spool is not drained yet, so it waits behind it)",
    ["topic", "reason"],
    registry=REGISTRY,
)
SPOOL_PENDING = Gauge(
    "stockstream_producer_spool_pending",
    "Records in the local spool not yet acknowledged by the broker",
    ["topic"],
    registry=REGISTRY,
)
SPOOLING = Gauge(
    "stockstream_producer_spooling",
    "1 while new records go to the spool (broker unavailable or spool draining), 0 while they"
    " are sent directly",
    ["topic"],
    registry=REGISTRY,
)
RECONCILED = Counter(
    "stockstream_producer_reconciled_total",
    "Spooled records whose earlier, unacknowledged send turned out to have reached the topic;"
    " they were not sent again (each one a duplicate avoided)",
    ["topic"],
    registry=REGISTRY,
)
SPOOL_DAMAGED = Counter(
    "stockstream_producer_spool_damaged_lines_total",
    "Spool lines that could not be read and were skipped (a partial last line after a crash)",
    ["topic"],
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "stockstream_producer_delivery_seconds",
    "Time from handing a record to the Kafka client to its acknowledgement by the broker",
    ["topic"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)


class ProducerInstruments:
    """The metric children of one topic, resolved once (label lookups are not free)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.sent = SENT.labels(topic)
        self.failed = {
            reason: FAILED.labels(topic, reason)
            for reason in ("timeout", "error", "shutdown", "rejected", "spool_error")
        }
        self.spooled = {reason: SPOOLED.labels(topic, reason) for reason in ("failed", "queued")}
        self.spool_pending = SPOOL_PENDING.labels(topic)
        self.spooling = SPOOLING.labels(topic)
        self.reconciled = RECONCILED.labels(topic)
        self.spool_damaged = SPOOL_DAMAGED.labels(topic)
        self.delivery_seconds = DELIVERY_SECONDS.labels(topic)
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
