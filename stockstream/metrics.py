"""Every Prometheus metric of stockstream, declared once, on one registry per process.

The worker serves it at `/metrics/` (web/views.py); `stockstream produce` serves it on
PRODUCER_METRICS_PORT. Longer than ~400 lines on purpose: it is the one list an operator, a
dashboard or an alert rule reads (monitoring/ is checked against it), so it stays one file.
Label values are fixed vocabularies (outcomes, reasons, partitions, the `Source` values): never
a URL, an error text or a key. Code on a hot path resolves its labelled children
once (`.labels()` per record shows up in profiles).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# -- aggregation (agents/aggregate.py) ---------------------------------------------------------
QUOTES = Counter(
    "stockstream_quotes_total",
    "Records read from stock-quotes, by outcome (applied, redelivered = re-read after a restart"
    " and already in the restored state, late, invalid, malformed)",
    ["outcome"],
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
STREAM_GAP_RECORDS = Counter(
    "stockstream_stream_gap_records_total",
    "Records of stock-quotes the worker's stream did not deliver in order (after a restart:"
    " those after the last checkpoint; otherwise records Faust skipped), read directly and"
    " processed",
    registry=REGISTRY,
)
STATE_UNREADABLE = Counter(
    "stockstream_state_unreadable_total",
    "Window-table values that could not be read when a partition was loaded (skipped and"
    " logged with their key; only damage or another release's format gets here)",
    registry=REGISTRY,
)
EVENT_LAG = Histogram(
    "stockstream_event_lag_seconds",
    "Wall clock minus market_timestamp when a quote is aggregated",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400),
    registry=REGISTRY,
)
EMIT_FAILURES = Counter(
    "stockstream_window_emit_failures_total",
    "Window sends that failed; each is looked up in the output partition before it is sent"
    " again, so a window is never written twice",
    registry=REGISTRY,
)
EMIT_LATENCY = Histogram(
    "stockstream_window_emit_seconds",
    "Time to write a batch of closed windows and have the broker acknowledge it",
    registry=REGISTRY,
)


# -- dead letters (deadletter.py), from every stage -------------------------------------------
DEAD_LETTERS = Counter(
    "stockstream_dead_letters_total",
    "Records sent to the dead-letter topic, by reason",
    ["reason"],
    registry=REGISTRY,
)

DEAD_LETTER_RETRIES = Counter(
    "stockstream_dead_letter_retries_total",
    "Dead letters sent again because the broker did not acknowledge them (the DLQ may then"
    " hold them twice; its consumers deduplicate by topic, partition and offset)",
    registry=REGISTRY,
)

# -- raw archive (archive/) --------------------------------------------------------------------
ARCHIVE_OBJECTS = Counter(
    "stockstream_archive_objects_total", "Parquet objects written to the archive", registry=REGISTRY
)
ARCHIVE_RECORDS = Counter(
    "stockstream_archive_records_total", "Quotes written to the archive", registry=REGISTRY
)
ARCHIVE_BYTES = Counter(
    "stockstream_archive_bytes_total", "Parquet bytes written to the archive", registry=REGISTRY
)
ARCHIVE_SKIPPED = Counter(
    "stockstream_archive_skipped_total",
    "Records of stock-quotes not archived, by reason (malformed, invalid: dead-lettered by the"
    " aggregation; archived: re-read at or below the partition's manifest)",
    ["reason"],
    registry=REGISTRY,
)
ARCHIVE_FAILURES = Counter(
    "stockstream_archive_failures_total",
    "Failed attempts, by operation (put-object, put-manifest, get-manifest, dead-letter, ...)",
    ["operation"],
    registry=REGISTRY,
)
ARCHIVE_RETRIES = Counter(
    "stockstream_archive_retries_total", "Retries after a failed attempt", registry=REGISTRY
)
ARCHIVE_LAST_SUCCESS = Gauge(
    "stockstream_archive_last_success_timestamp_seconds",
    "Unix time of the last batch stored",
    registry=REGISTRY,
)
ARCHIVE_BLOCKED = Gauge(
    "stockstream_archive_blocked",
    "1 while storage keeps failing beyond ARCHIVE_MAX_RETRIES under the block policy",
    registry=REGISTRY,
)
ARCHIVE_FLUSH = Histogram(
    "stockstream_archive_flush_seconds",
    "Time to encode and store one batch (retries included)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)

# -- warehouse loader (warehouse/) -------------------------------------------------------------
WAREHOUSE_ROWS = Counter(
    "stockstream_warehouse_rows_total",
    "Aggregated windows handled by the warehouse loader, by outcome"
    " (written = acknowledged by the warehouse, rejected = dead-lettered)",
    ["outcome"],
    registry=REGISTRY,
)
WAREHOUSE_FAILURES = Counter(
    "stockstream_warehouse_failures_total",
    "Failed warehouse write attempts; the batch is retried after a backoff",
    registry=REGISTRY,
)
WAREHOUSE_UP = Gauge(
    "stockstream_warehouse_up",
    "1 while warehouse writes succeed, 0 while they fail (batch waiting for a retry)",
    registry=REGISTRY,
)
WAREHOUSE_PENDING = Gauge(
    "stockstream_warehouse_pending_rows",
    "Records of the batch currently waiting for the warehouse",
    registry=REGISTRY,
)
WAREHOUSE_BATCH_SECONDS = Histogram(
    "stockstream_warehouse_batch_seconds",
    "Time from a batch's first write attempt to the warehouse's acknowledgement",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
WAREHOUSE_LAST_SUCCESS = Gauge(
    "stockstream_warehouse_last_success_timestamp_seconds",
    "Unix time of the last batch acknowledged by the warehouse",
    registry=REGISTRY,
)

# -- quote producer (producer/); every one has a `topic` label --------------------------------
PRODUCER_SENT = Counter(
    "stockstream_producer_sent_total",
    "Records acknowledged by the broker (acks=all): sent directly, re-sent from the spool, or"
    " found already in the topic when reconciling an unacknowledged send",
    ["topic"],
    registry=REGISTRY,
)
PRODUCER_FAILED = Counter(
    "stockstream_producer_failed_total",
    "Delivery attempts that failed, by reason: timeout (not acknowledged within"
    " PRODUCER_DELIVERY_TIMEOUT_SECONDS), error (send error), shutdown (still unacknowledged"
    " at close) -- these records go to the spool and are re-sent; rejected (refused by Kafka,"
    " e.g. too large) and spool_error (could not be spooled) -- these are lost",
    ["topic", "reason"],
    registry=REGISTRY,
)
PRODUCER_SPOOLED = Counter(
    "stockstream_producer_spooled_total",
    "Records written to the local spool, by reason: failed (delivery failed), queued (the"
    " broker is unavailable or the spool is not drained yet, so it waits behind it)",
    ["topic", "reason"],
    registry=REGISTRY,
)
PRODUCER_SPOOL_PENDING = Gauge(
    "stockstream_producer_spool_pending",
    "Records in the local spool not yet acknowledged by the broker",
    ["topic"],
    registry=REGISTRY,
)
PRODUCER_SPOOLING = Gauge(
    "stockstream_producer_spooling",
    "1 while new records go to the spool (broker unavailable or spool draining), 0 while they"
    " are sent directly",
    ["topic"],
    registry=REGISTRY,
)
PRODUCER_RECONCILED = Counter(
    "stockstream_producer_reconciled_total",
    "Spooled records whose earlier, unacknowledged send turned out to have reached the topic;"
    " they were not sent again (each one a duplicate avoided)",
    ["topic"],
    registry=REGISTRY,
)
PRODUCER_SPOOL_DAMAGED = Counter(
    "stockstream_producer_spool_damaged_lines_total",
    "Spool lines that could not be read and were skipped (a partial last line after a crash)",
    ["topic"],
    registry=REGISTRY,
)
PRODUCER_DELIVERY_SECONDS = Histogram(
    "stockstream_producer_delivery_seconds",
    "Time from handing a record to the Kafka client to its acknowledgement by the broker",
    ["topic"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)

# -- quote sources (sources/) ------------------------------------------------------------------
SOURCE_REQUESTS = Counter(
    "stockstream_source_requests_total",
    "HTTP calls of the sources to their API, by outcome (ok, unknown_symbol, malformed,"
    " rate_limited, server_error, timeout, connection_error, client_error, auth_error,"
    " no_access)",
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
    "Polls or trades that produced no quote, by reason (unchanged, unknown_symbol, no_access,"
    " malformed, failed = retries exhausted; see stockstream_source_cache_total for"
    " wait_timeout)",
    ["source", "reason"],
    registry=REGISTRY,
)
SOURCE_UNKNOWN_SYMBOLS = Counter(
    "stockstream_source_unknown_symbols_total",
    "Configured symbols the API does not know (counted once per symbol)",
    ["source"],
    registry=REGISTRY,
)
SOURCE_DENIED_SYMBOLS = Gauge(
    "stockstream_source_denied_symbols",
    "Configured symbols the API key may not see (HTTP 401/403 'no access'), skipped and re-checked",
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
SOURCE_WS_SHORT_CONNECTIONS = Counter(
    "stockstream_source_ws_short_connections_total",
    "Websocket connections the server closed shortly after they opened (Finnhub drops the"
    " older connection of a key when another one opens)",
    ["source"],
    registry=REGISTRY,
)
SOURCE_WS_KEY_CONFLICTS = Counter(
    "stockstream_source_ws_key_conflicts_total",
    "Reconnect storms detected: connections closed by the server shortly after opening,"
    " repeatedly, i.e. another connection uses the API key (Finnhub allows one per key)",
    ["source"],
    registry=REGISTRY,
)
SOURCE_WS_UNSUBSCRIBED = Gauge(
    "stockstream_source_ws_unsubscribed_symbols",
    "Configured symbols not subscribed because they are beyond FINNHUB_WS_MAX_SYMBOLS",
    ["source"],
    registry=REGISTRY,
)
SOURCE_WS_REFUSED = Counter(
    "stockstream_source_ws_subscriptions_refused_total",
    "'Subscribing to too many symbols' errors: Finnhub refused a subscription (the real cap"
    " is below FINNHUB_WS_MAX_SYMBOLS)",
    ["source"],
    registry=REGISTRY,
)
SOURCE_WS_LEASE_HELD = Gauge(
    "stockstream_source_ws_lease_held",
    "1 while this replica holds the Finnhub socket lease in Redis, 0 otherwise",
    registry=REGISTRY,
)
SOURCE_WS_LEASE = Counter(
    "stockstream_source_ws_lease_total",
    "Finnhub socket lease events, by outcome (acquired, lost = another replica holds it,"
    " released, standby = waiting for the holder, redis_error, unleased = connected without"
    " the lease because Redis stayed unreachable)",
    ["outcome"],
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

# -- operator view: lag and batch timings (agents/aggregate/) ---------------------------------
CONSUMER_LAG_RECORDS = Gauge(
    "stockstream_consumer_lag_records",
    "Records of an owned input partition not processed yet (high watermark - next offset)",
    ["topic", "partition"],
    registry=REGISTRY,
)
CONSUMER_LAG_SECONDS = Gauge(
    "stockstream_consumer_lag_seconds",
    "While a partition is behind: age of the last record processed (Kafka timestamp); 0 when"
    " caught up",
    ["topic", "partition"],
    registry=REGISTRY,
)
WINDOW_CLOSE_LAG = Histogram(
    "stockstream_window_close_lag_seconds",
    "Emit acknowledged minus the time the window could close: the Kafka timestamp of the"
    " record that moved the watermark past end + grace (or of the idle tick that flushed it)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
AGENT_BATCH_SECONDS = Histogram(
    "stockstream_agent_batch_seconds",
    "Time an agent spends on one batch of records (processing, state writes, dead letters)",
    ["agent"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


# -- anomaly detection (agents/anomaly/) ----------------------------------------------------------
ANOMALIES = Counter(
    "stockstream_anomalies_total",
    "Anomalies written to stock-anomalies, by kind (return, volume); each once, also across"
    " restarts (one found already in the topic after a restart is not counted again)",
    ["kind"],
    registry=REGISTRY,
)

# -- alerts (alerts/): anomalies delivered to people ------------------------------------------
ALERT_DELIVERIES = Counter(
    "stockstream_alert_deliveries_total",
    "Alert delivery events per receiver (slack, pagerduty), by outcome: delivered, retried (an"
    " attempt failed and is retried), throttled (HTTP 429, retried), failed (given up on:"
    " dead-lettered as alert-failed), duplicate (already delivered by this process, skipped)",
    ["receiver", "outcome"],
    registry=REGISTRY,
)
ALERT_PENDING = Gauge(
    "stockstream_alert_pending",
    "Anomaly records read by the alert services and not yet delivered or dead-lettered (all"
    " receivers together; stays up while a receiver is down)",
    registry=REGISTRY,
)

# -- live chart (web/live.py) -----------------------------------------------------------------
CHART_CLIENTS = Gauge(
    "stockstream_chart_clients",
    "Live chart event streams open on this worker",
    registry=REGISTRY,
)
CHART_CLIENTS_DROPPED = Counter(
    "stockstream_chart_clients_dropped_total",
    "Live chart streams ended because their client did not keep up (queue full, write stalled)",
    registry=REGISTRY,
)
CHART_RECORDS_SKIPPED = Counter(
    "stockstream_chart_records_skipped_total",
    "Records of the aggregated or anomalies topic the live chart could not read (skipped and"
    " logged; the chart only reads, the owning stages dead-letter)",
    ["topic"],
    registry=REGISTRY,
)
