"""Prometheus metrics, one registry per process, served at `/metrics` by the Faust web server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

QUOTES = Counter(
    "stockstream_quotes_total",
    "Records read from stock-quotes, by outcome "
    "(applied, replayed = already in restored state, late, invalid, malformed)",
    ["outcome"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "stockstream_dead_letters_total",
    "Records sent to the dead-letter topic, by reason",
    ["reason"],
    registry=REGISTRY,
)
WINDOWS_EMITTED = Counter(
    "stockstream_windows_emitted_total",
    "Closed one-minute windows written to stock-quotes-aggregated, by trigger",
    ["trigger"],
    registry=REGISTRY,
)
WINDOWS_SUPPRESSED = Counter(
    "stockstream_windows_suppressed_total",
    "Windows found already emitted before a restart, so not emitted again",
    registry=REGISTRY,
)
OPEN_WINDOWS = Gauge(
    "stockstream_open_windows",
    "Windows currently open, per source partition",
    ["partition"],
    registry=REGISTRY,
)
WATERMARK = Gauge(
    "stockstream_watermark_seconds",
    "Event-time watermark (highest market_timestamp seen), per source partition",
    ["partition"],
    registry=REGISTRY,
)
EVENT_LAG = Histogram(
    "stockstream_event_lag_seconds",
    "Wall clock minus market_timestamp when a quote is aggregated",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400),
    registry=REGISTRY,
)
EMIT_LATENCY = Histogram(
    "stockstream_window_emit_seconds",
    "Time to write a batch of closed windows and have the broker acknowledge it",
    registry=REGISTRY,
)
