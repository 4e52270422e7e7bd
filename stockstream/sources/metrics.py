"""Prometheus metrics of the quote sources, on the process registry (`stockstream.metrics`).

Label values are fixed vocabularies (`source` is a `contracts.Source` value, outcomes and
message types are the literals used in the sources): never a URL, an error text or the key.
"""

from __future__ import annotations

from prometheus_client import Counter

from stockstream.metrics import REGISTRY

SOURCE_REQUESTS = Counter(
    "stockstream_source_requests_total",
    "HTTP calls of the sources to their API, by outcome (ok, unknown_symbol, malformed,"
    " rate_limited, server_error, timeout, connection_error, client_error, auth_error)",
    ["source", "outcome"],
    registry=REGISTRY,
)
SOURCE_QUOTES = Counter(
    "stockstream_source_quotes_total",
    "Quotes handed to the producer by the sources",
    ["source"],
    registry=REGISTRY,
)
SOURCE_SKIPPED = Counter(
    "stockstream_source_skipped_total",
    "Polls or trades that produced no quote, by reason (unchanged, unknown_symbol, malformed,"
    " failed = retries exhausted; see stockstream_source_cache_total for wait_timeout)",
    ["source", "reason"],
    registry=REGISTRY,
)
SOURCE_UNKNOWN_SYMBOLS = Counter(
    "stockstream_source_unknown_symbols_total",
    "Configured symbols the API does not know (counted once per symbol)",
    ["source"],
    registry=REGISTRY,
)
SOURCE_RATE_LIMITED = Counter(
    "stockstream_source_rate_limited_total",
    "HTTP 429 answers; each one pauses the shared rate limiter",
    ["source"],
    registry=REGISTRY,
)
SOURCE_RETRIES = Counter(
    "stockstream_source_retries_total",
    "Retried calls, by reason (timeout, server_error, rate_limited, connection_error)",
    ["source", "reason"],
    registry=REGISTRY,
)
SOURCE_RATE_LIMIT_WAIT = Counter(
    "stockstream_source_rate_limit_wait_seconds_total",
    "Seconds spent waiting for the client-side rate limiter",
    ["source"],
    registry=REGISTRY,
)
SOURCE_RECONNECTS = Counter(
    "stockstream_source_reconnects_total",
    "Websocket reconnections after a dropped or failed connection",
    ["source"],
    registry=REGISTRY,
)
SOURCE_MESSAGES = Counter(
    "stockstream_source_messages_total",
    "Websocket messages received, by type (trade, ping, error, malformed, other)",
    ["source", "type"],
    registry=REGISTRY,
)
SOURCE_CACHE = Counter(
    "stockstream_source_cache_total",
    "Shared quote cache lookups, by outcome (hit, miss = this replica called the API,"
    " waited = read the answer another replica fetched, wait_timeout, error = Redis"
    " unavailable, called the API directly)",
    ["outcome"],
    registry=REGISTRY,
)
