"""The one typed place for configuration: every setting of stockstream, with its variable.

Values come from, highest precedence first: the process environment, a `.env` file, the profile
`config/<STOCKSTREAM_ENV>.yml` (a flat mapping of the same variable names), then the defaults
below. Any variable may instead be given as `<NAME>_FILE` pointing at a file that holds the value
(docker secrets). Every field names its variable, so an invalid value is reported by that name,
and secrets are wrapped in `Secret` so they never reach a log line or an error message (the
mechanism is in envconfig.py). Longer than ~400 lines on purpose: it is the one typed place a
reader looks for any setting; the reading mechanism lives in envconfig.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stockstream import envconfig

# Secret and SettingsError belong to every user of the settings: re-exported here.
from stockstream.envconfig import Secret as Secret
from stockstream.envconfig import SettingsError as SettingsError
from stockstream.envconfig import var

ENVIRONMENTS = ("dev", "staging", "prod")


def _positive(value: Any) -> bool:
    return bool(value > 0)


def _non_negative(value: Any) -> bool:
    return bool(value >= 0)


def _port(value: Any) -> bool:
    return 0 < int(value) < 65536


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = var("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    quotes_topic: str = var("KAFKA_QUOTES_TOPIC", "stock-quotes")
    aggregated_topic: str = var("KAFKA_AGGREGATED_TOPIC", "stock-quotes-aggregated")
    dlq_topic: str = var("KAFKA_DLQ_TOPIC", "stock-quotes-dlq")
    anomalies_topic: str = var("KAFKA_ANOMALIES_TOPIC", "stock-anomalies")
    # A dead letter larger than this carries a cut original (the broker's message.max.bytes
    # and the producer's max_request_size are 1 MiB by default); keep it below both.
    dlq_max_record_bytes: int = var(
        "DLQ_MAX_RECORD_BYTES", 900_000, lambda v: v >= 16_384, "must be >= 16384"
    )
    partitions: int = var("KAFKA_PARTITIONS", 3, _positive, "must be > 0")
    replication_factor: int = var("KAFKA_REPLICATION_FACTOR", 1, _positive, "must be > 0")
    # Connection security, used by every client (kafka/clients.py); checked in load_settings.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = var(
        "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"
    )
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = var(
        "KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"
    )
    sasl_username: str = var("KAFKA_SASL_USERNAME", "")
    sasl_password: Secret = var("KAFKA_SASL_PASSWORD", Secret(""))
    # Empty = the system's trusted CAs.
    ssl_cafile: Path | None = var("KAFKA_SSL_CAFILE", None)
    # A client certificate (PEM), for listeners that require one; the key may be in the same file.
    ssl_certfile: Path | None = var("KAFKA_SSL_CERTFILE", None)
    ssl_keyfile: Path | None = var("KAFKA_SSL_KEYFILE", None)
    ssl_key_password: Secret = var("KAFKA_SSL_KEY_PASSWORD", Secret(""))
    # false: the certificate chain is still verified, the broker's host name is not.
    ssl_check_hostname: bool = var("KAFKA_SSL_CHECK_HOSTNAME", True)

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class AggregationSettings:
    window_seconds: int = var("AGG_WINDOW_SECONDS", 60, _positive, "must be > 0")
    grace_seconds: float = var("AGG_GRACE_SECONDS", 5.0, _non_negative, "must be >= 0")
    idle_timeout_seconds: float = var("AGG_IDLE_TIMEOUT_SECONDS", 30.0, _positive, "must be > 0")
    idle_check_seconds: float = var("AGG_IDLE_CHECK_SECONDS", 1.0, _positive, "must be > 0")
    # How many symbols of a partition must have reached an event time before its windows
    # close there: one symbol with a wrong clock cannot close the others' windows.
    watermark_quorum: int = var("AGG_WATERMARK_QUORUM", 2, _positive, "must be > 0")
    # Trades carrying any of these condition codes (Finnhub's `c`) add their volume to the
    # window but do not set its prices (README, "Trade conditions").
    excluded_conditions: tuple[str, ...] = var(
        "AGG_EXCLUDED_CONDITIONS", ("3", "5", "12", "17", "24", "26", "37")
    )

    @property
    def excluded_condition_codes(self) -> frozenset[str]:
        """AGG_EXCLUDED_CONDITIONS as a set; `none` (an empty value means the default)
        lets every trade set prices."""
        return frozenset(c for c in self.excluded_conditions if c.lower() != "none")


@dataclass(frozen=True)
class QuoteSettings:
    """The `stock-quotes` contract's tunable bounds (contracts/quotes.py)."""

    # Finnhub's own formats: AAPL, BRK.B, 0700.HK, ^GSPC, COX&KINGS.NS, OANDA:EUR_USD,
    # FXCM:XAU/USD, "IC MARKETS:1", BINANCE:BTCUSDT, HUOBI:btcusdt. ASCII letters, digits,
    # the punctuation those use and inner spaces; never a control character or an outer space.
    # Matched in full (no anchors needed, and none to trip a shell or compose over `$`).
    symbol_pattern: str = var("QUOTE_SYMBOL_PATTERN", r"[A-Za-z0-9^][A-Za-z0-9 ._:/^&=+-]*(?<! )")
    max_future_seconds: float = var(
        "QUOTE_MAX_FUTURE_SECONDS", 300.0, _non_negative, "must be >= 0"
    )


@dataclass(frozen=True)
class AnomalySettings:
    """Real-time anomalies of the one-minute windows (agents/anomaly/)."""

    enabled: bool = var("ANOMALY_ENABLED", True)
    z_threshold: float = var("ANOMALY_Z_THRESHOLD", 3.0, _positive, "must be > 0")
    history_windows: int = var(
        "ANOMALY_HISTORY_WINDOWS", 60, lambda v: v >= 2, "must be >= 2 (windows of history)"
    )
    min_history: int = var(
        "ANOMALY_MIN_HISTORY", 20, lambda v: v >= 2, "must be >= 2 (windows before judging)"
    )
    cooldown_seconds: float = var("ANOMALY_COOLDOWN_SECONDS", 300.0, _non_negative, "must be >= 0")


@dataclass(frozen=True)
class AlertSettings:
    """Delivery of anomalies to people (alerts/): Slack-compatible webhook, PagerDuty."""

    # Webhook URLs and routing keys are credentials: secrets, readable from *_FILE.
    slack_webhook_url: Secret = var("ALERT_SLACK_WEBHOOK_URL", Secret(""))
    pagerduty_routing_key: Secret = var("ALERT_PAGERDUTY_ROUTING_KEY", Secret(""))
    pagerduty_url: str = var("ALERT_PAGERDUTY_URL", "https://events.pagerduty.com/v2/enqueue")
    max_per_minute: int = var("ALERT_MAX_PER_MINUTE", 30, _positive, "must be > 0")
    max_retries: int = var("ALERT_MAX_RETRIES", 5, _non_negative, "must be >= 0")
    timeout_seconds: float = var("ALERT_TIMEOUT_SECONDS", 10.0, _positive, "must be > 0")
    backoff_initial_seconds: float = var(
        "ALERT_BACKOFF_INITIAL_SECONDS", 1.0, _positive, "must be > 0"
    )
    backoff_max_seconds: float = var("ALERT_BACKOFF_MAX_SECONDS", 60.0, _positive, "must be > 0")


@dataclass(frozen=True)
class WorkerSettings:
    app_id: str = var("STOCKSTREAM_APP_ID", "stockstream")
    web_host: str = var("STOCKSTREAM_WEB_HOST", "127.0.0.1")
    web_port: int = var("STOCKSTREAM_WEB_PORT", 6066, _port, "must be a TCP port")
    # Where other workers forward requests to this one; empty: http://<web_host>:<web_port>.
    web_url: str = var("STOCKSTREAM_WEB_URL", "")
    # Required by every web endpoint that changes state or shows more than read-only views
    # (`Authorization: Bearer <token>`); empty = those endpoints are refused.
    web_token: Secret = var("STOCKSTREAM_WEB_TOKEN", Secret(""))
    store: str = var("STOCKSTREAM_STORE", "memory://")
    producer_linger_seconds: float = var(
        "STOCKSTREAM_PRODUCER_LINGER_SECONDS", 0.02, _non_negative, "must be >= 0"
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = var(
        "STOCKSTREAM_PROCESSING_GUARANTEE", "at_least_once"
    )
    commit_interval_seconds: float = var(
        "STOCKSTREAM_COMMIT_INTERVAL_SECONDS", 2.8, _positive, "must be > 0"
    )
    # exactly_once was evaluated against Kafka 4.1 and lost windows (README, "Guarantees");
    # it stays reachable only for re-evaluation (benchmarks/evaluate_exactly_once.py).
    unsafe_faust_exactly_once: bool = var("STOCKSTREAM_UNSAFE_FAUST_EXACTLY_ONCE", False)
    session_timeout_seconds: float = var(
        "STOCKSTREAM_SESSION_TIMEOUT_SECONDS", 30.0, _positive, "must be > 0"
    )
    consumer_auto_offset_reset: Literal["earliest", "latest"] = var(
        "STOCKSTREAM_AUTO_OFFSET_RESET", "earliest"
    )
    # The broker's longest wait before answering a fetch with no new records. Faust fixes it
    # at 1.5 s, which a live quote then waited (README, "Performance"); short costs only empty
    # fetches while idle. Below aiokafka's request timeout (40 s) by a wide margin.
    fetch_max_wait_seconds: float = var(
        "STOCKSTREAM_FETCH_MAX_WAIT_SECONDS",
        0.1,
        lambda v: 0 < v <= 10,
        "must be > 0 and <= 10",
    )


@dataclass(frozen=True)
class LogSettings:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = var("LOG_LEVEL", "INFO")
    format: Literal["json", "text"] = var("LOG_FORMAT", "json")


@dataclass(frozen=True)
class ProducerSettings:
    linger_ms: int = var("PRODUCER_LINGER_MS", 20, _non_negative, "must be >= 0")
    batch_bytes: int = var("PRODUCER_BATCH_BYTES", 262144, _positive, "must be > 0")
    compression: Literal["none", "gzip", "lz4", "zstd"] = var("PRODUCER_COMPRESSION", "lz4")
    request_timeout_ms: int = var("PRODUCER_REQUEST_TIMEOUT_MS", 30000, _positive, "must be > 0")
    # A record not acknowledged within this time goes to the local spool instead.
    delivery_timeout_seconds: float = var(
        "PRODUCER_DELIVERY_TIMEOUT_SECONDS", 60.0, _positive, "must be > 0"
    )
    spool_dir: Path = var("PRODUCER_SPOOL_DIR", Path("data/spool"))
    spool_retry_seconds: float = var("PRODUCER_SPOOL_RETRY_SECONDS", 5.0, _positive, "must be > 0")
    # Prometheus /metrics of `stockstream produce` on 127.0.0.1:<port>; 0 = not served.
    metrics_port: int = var("PRODUCER_METRICS_PORT", 0, _non_negative, "must be >= 0")
    # Loopback unless told otherwise (a Prometheus in another container needs 0.0.0.0).
    metrics_host: str = var("PRODUCER_METRICS_HOST", "127.0.0.1")


@dataclass(frozen=True)
class SimulatorSettings:
    symbols: int = var("SIM_SYMBOLS", 20, _positive, "must be > 0")
    rate: float = var("SIM_RATE", 50.0, _positive, "must be > 0 (quotes per second)")
    seed: int = var("SIM_SEED", 42)


@dataclass(frozen=True)
class FinnhubSettings:
    api_key: Secret = var("FINNHUB_API_KEY", Secret(""))
    symbols: tuple[str, ...] = var("STOCK_SYMBOLS", ("AAPL", "MSFT", "TSLA", "GOOGL", "AMZN"))
    base_url: str = var("FINNHUB_BASE_URL", "https://finnhub.io/api/v1")
    ws_url: str = var("FINNHUB_WS_URL", "wss://ws.finnhub.io")
    poll_interval_seconds: float = var(
        "FINNHUB_POLL_INTERVAL_SECONDS", 15.0, _positive, "must be > 0"
    )
    calls_per_minute: int = var("FINNHUB_CALLS_PER_MINUTE", 60, _positive, "must be > 0")
    max_calls_per_second: int = var("FINNHUB_MAX_CALLS_PER_SECOND", 30, _positive, "must be > 0")
    timeout_seconds: float = var("FINNHUB_TIMEOUT_SECONDS", 10.0, _positive, "must be > 0")
    max_retries: int = var("FINNHUB_MAX_RETRIES", 5, _non_negative, "must be >= 0")
    backoff_initial_seconds: float = var(
        "FINNHUB_BACKOFF_INITIAL_SECONDS", 0.5, _positive, "must be > 0"
    )
    backoff_max_seconds: float = var("FINNHUB_BACKOFF_MAX_SECONDS", 30.0, _positive, "must be > 0")
    # Finnhub refuses subscriptions beyond about 50 symbols per websocket (websocket.py).
    ws_max_symbols: int = var("FINNHUB_WS_MAX_SYMBOLS", 50, _positive, "must be > 0")
    # One websocket per API key: replicas sharing REDIS_URL take turns (socket_lease.py).
    # Below a second a Redis round trip or a pause could let a live holder's lease expire.
    ws_lease_seconds: float = var(
        "FINNHUB_WS_LEASE_SECONDS", 10.0, lambda v: v >= 1, "must be >= 1 (seconds)"
    )
    # A symbol outside the key's plan is asked again this often (plans change).
    denied_recheck_seconds: float = var(
        "FINNHUB_DENIED_RECHECK_SECONDS", 3600.0, _positive, "must be > 0"
    )


@dataclass(frozen=True)
class CacheSettings:
    # The URL may carry a password, so it is a secret.
    redis_url: Secret = var("REDIS_URL", Secret(""))
    quote_ttl_seconds: float = var("CACHE_QUOTE_TTL_SECONDS", 10.0, _positive, "must be > 0")


@dataclass(frozen=True)
class ReplaySettings:
    speed: float = var("REPLAY_SPEED", 1.0, _non_negative, "must be >= 0 (0 = as fast as possible)")


@dataclass(frozen=True)
class ArchiveSettings:
    """The raw archive (bronze layer): S3/MinIO when S3_ENDPOINT is set, else a local folder."""

    enabled: bool = var("ARCHIVE_ENABLED", True)
    endpoint: str = var("S3_ENDPOINT", "")
    access_key: Secret = var("S3_ACCESS_KEY", Secret(""))
    secret_key: Secret = var("S3_SECRET_KEY", Secret(""))
    secure: bool = var("S3_SECURE", True)
    region: str = var("S3_REGION", "us-east-1")
    bucket: str = var("S3_BUCKET", "stockstream-bronze")
    local_dir: Path = var("ARCHIVE_LOCAL_DIR", Path("data/archive"))
    batch_records: int = var("ARCHIVE_BATCH_RECORDS", 10000, _positive, "must be > 0")
    batch_bytes: int = var("ARCHIVE_BATCH_BYTES", 8 * 1024 * 1024, _positive, "must be > 0")
    batch_seconds: float = var("ARCHIVE_BATCH_SECONDS", 60.0, _positive, "must be > 0")
    max_retries: int = var("ARCHIVE_MAX_RETRIES", 5, _non_negative, "must be >= 0")
    backoff_initial_seconds: float = var(
        "ARCHIVE_BACKOFF_INITIAL_SECONDS", 0.5, _positive, "must be > 0"
    )
    backoff_max_seconds: float = var("ARCHIVE_BACKOFF_MAX_SECONDS", 30.0, _positive, "must be > 0")
    failure_policy: Literal["block", "dead-letter"] = var("ARCHIVE_FAILURE_POLICY", "block")
    # child: a process of its own that the worker starts, stops and restarts, so the archive's
    # CPU is not taken from the aggregation (service_process.py); inline: in the worker's
    # event loop, one Python process less, for a machine with one core.
    process: Literal["child", "inline"] = var("ARCHIVE_PROCESS", "child")


@dataclass(frozen=True)
class WarehouseSettings:
    """Where closed windows are loaded: embedded DuckDB (default) or BigQuery."""

    enabled: bool = var("WAREHOUSE_ENABLED", True)
    backend: Literal["duckdb", "bigquery"] = var("WAREHOUSE_BACKEND", "duckdb")
    # Empty = <STOCKSTREAM_DATA_DIR>/warehouse.duckdb
    duckdb_path: Path | None = var("DUCKDB_PATH", None)
    # false: the worker opens the DuckDB file per batch, so other processes can read it between
    duckdb_hold_connection: bool = var("DUCKDB_HOLD_CONNECTION", True)
    bq_project: str = var("BQ_PROJECT", "")
    bq_dataset: str = var("BQ_DATASET", "stock")
    bq_table: str = var("BQ_TABLE", "aggregates_1m")
    bq_location: str = var("BQ_LOCATION", "US")
    # Service-account key file; empty = application default credentials.
    bq_credentials_file: Path | None = var("BQ_CREDENTIALS_FILE", None)
    # Only for emulators/tests: a custom API endpoint (anonymous credentials).
    bq_api_endpoint: str = var("BQ_API_ENDPOINT", "")
    batch_rows: int = var("WAREHOUSE_BATCH_ROWS", 500, _positive, "must be > 0")
    batch_seconds: float = var("WAREHOUSE_BATCH_SECONDS", 5.0, _positive, "must be > 0")
    retry_deadline_seconds: float = var(
        "WAREHOUSE_RETRY_DEADLINE_SECONDS", 120.0, _positive, "must be > 0"
    )


@dataclass(frozen=True)
class Settings:
    env: Literal["dev", "staging", "prod"] = var("STOCKSTREAM_ENV", "dev")
    data_dir: Path = var("STOCKSTREAM_DATA_DIR", Path("data"))
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    quotes: QuoteSettings = field(default_factory=QuoteSettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    producer: ProducerSettings = field(default_factory=ProducerSettings)
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)
    finnhub: FinnhubSettings = field(default_factory=FinnhubSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    warehouse: WarehouseSettings = field(default_factory=WarehouseSettings)
    anomaly: AnomalySettings = field(default_factory=AnomalySettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)


#: Settings that were removed, with what replaced them: set, they stop the start-up rather than
#: being ignored in silence.
RETIRED = {
    name: "the aggregation agent takes each fetched batch of a partition whole"
    " (README, Performance); its size follows FAUST_CONSUMER_MAX_FETCH_SIZE and"
    " STOCKSTREAM_FETCH_MAX_WAIT_SECONDS"
    for name in ("AGG_BATCH_MAX_EVENTS", "AGG_BATCH_MAX_SECONDS")
}


def load_settings(
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = ".env",
    config_dir: str | Path | None = None,
) -> Settings:
    """Build the settings; raises SettingsError naming the offending variable."""
    layered = envconfig.environment(environ, dotenv_path)
    env_raw = layered.get("STOCKSTREAM_ENV", "dev").strip().lower() or "dev"
    if env_raw not in ENVIRONMENTS:
        raise SettingsError(
            f"STOCKSTREAM_ENV: must be one of {', '.join(ENVIRONMENTS)}, got {env_raw!r}"
        )
    directory = Path(config_dir or layered.get("STOCKSTREAM_CONFIG_DIR", "config"))
    profile = envconfig.profile_values(directory, env_raw, "STOCKSTREAM_ENV" in layered)
    values = {**profile, **layered}
    for name in sorted(values.keys() & RETIRED.keys()):
        raise SettingsError(f"{name}: no longer read: {RETIRED[name]}")
    settings: Settings = envconfig.build(Settings, values)
    if settings.env == "prod":  # first: a refused credential is the problem to report
        _check_prod(settings, values)
    try:
        re.compile(settings.quotes.symbol_pattern)
    except re.error as exc:
        raise SettingsError(
            f"QUOTE_SYMBOL_PATTERN: not a valid regular expression: {exc}"
        ) from None
    for group, prefix in ((settings.finnhub, "FINNHUB"), (settings.archive, "ARCHIVE")):
        initial, maximum = group.backoff_initial_seconds, group.backoff_max_seconds
        if initial > maximum:
            raise SettingsError(
                f"{prefix}_BACKOFF_INITIAL_SECONDS: must not exceed"
                f" {prefix}_BACKOFF_MAX_SECONDS ({maximum:g}), got {initial:g}"
            )
    _check_kafka_security(settings.kafka)
    worker = settings.worker
    if worker.processing_guarantee == "exactly_once" and not worker.unsafe_faust_exactly_once:
        raise SettingsError(
            "STOCKSTREAM_PROCESSING_GUARANTEE: exactly_once is not supported: with"
            " faust-streaming 0.15 its transactional producers are fenced and windows are lost"
            " (see README, Guarantees); at_least_once already emits each window once"
        )
    return settings


def _check_prod(settings: Settings, values: Mapping[str, str]) -> None:
    """What production refuses to start with, although each value works on its own: data a
    single broker loss destroys, credentials readable by anyone who can list the process
    environment or the deployment, and a web view that anyone on the network can drive."""
    if settings.kafka.replication_factor < 2:
        raise SettingsError(
            "KAFKA_REPLICATION_FACTOR: must be >= 2 with STOCKSTREAM_ENV=prod (one broker's"
            f" loss must not lose data), got {settings.kafka.replication_factor}"
        )
    for name in envconfig.secret_variables(Settings):
        if values.get(name, "").strip():
            raise SettingsError(
                f"{name}: a plain value is refused with STOCKSTREAM_ENV=prod;"
                f" give {name}_FILE (a mounted secret) instead"
            )
    host = settings.worker.web_host
    if not _is_loopback(host) and not settings.worker.web_token:
        raise SettingsError(
            f"STOCKSTREAM_WEB_HOST: {host!r} is reachable from other hosts, which"
            " STOCKSTREAM_ENV=prod allows only with STOCKSTREAM_WEB_TOKEN_FILE set"
        )


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _check_kafka_security(kafka: KafkaSettings) -> None:
    """Settings that cannot work together, or that would be silently ignored."""
    protocol = kafka.security_protocol
    given = f"KAFKA_SECURITY_PROTOCOL={protocol}"
    if kafka.uses_sasl:
        if not kafka.sasl_username:
            raise SettingsError(f"KAFKA_SASL_USERNAME: required with {given}")
        if not kafka.sasl_password:
            raise SettingsError(
                f"KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE): required with {given}"
            )
    elif kafka.sasl_username or kafka.sasl_password:
        name = "KAFKA_SASL_USERNAME" if kafka.sasl_username else "KAFKA_SASL_PASSWORD"
        raise SettingsError(
            f"{name}: set, but {given} does not authenticate with SASL"
            " (use SASL_PLAINTEXT or SASL_SSL)"
        )
    files = {
        "KAFKA_SSL_CAFILE": kafka.ssl_cafile,
        "KAFKA_SSL_CERTFILE": kafka.ssl_certfile,
        "KAFKA_SSL_KEYFILE": kafka.ssl_keyfile,
    }
    if not kafka.uses_tls:
        for name, path in files.items():
            if path is not None:
                raise SettingsError(
                    f"{name}: set, but {given} does not use TLS (use SSL or SASL_SSL)"
                )
        if kafka.ssl_key_password:
            raise SettingsError(
                f"KAFKA_SSL_KEY_PASSWORD: set, but {given} does not use TLS (use SSL or SASL_SSL)"
            )
        return
    for name, path in files.items():
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {str(path)!r}: {exc.strerror}") from None
    if kafka.ssl_keyfile is not None and kafka.ssl_certfile is None:
        raise SettingsError("KAFKA_SSL_KEYFILE: set without KAFKA_SSL_CERTFILE (its certificate)")
    if kafka.ssl_key_password and kafka.ssl_certfile is None:
        raise SettingsError(
            "KAFKA_SSL_KEY_PASSWORD: set without KAFKA_SSL_CERTFILE (the key it unlocks)"
        )


def documented_variables() -> list[tuple[str, str]]:
    """(variable, default) for every setting, for `.env.example` and its test."""
    return envconfig.documented_variables(Settings)
