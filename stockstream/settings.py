"""The one typed place for configuration.

Values come from, highest precedence first: the process environment, a `.env` file, the profile
`config/<STOCKSTREAM_ENV>.yml` (a flat mapping of the same variable names), then the defaults
below. Any variable may instead be given as `<NAME>_FILE` pointing at a file that holds the value
(docker secrets). Every field names its variable, so an invalid value is reported by that name,
and secrets are wrapped in `Secret` so they never reach a log line or an error message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from dotenv import dotenv_values

ENVIRONMENTS = ("dev", "staging", "prod")


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


Check = Callable[[Any], bool]


def var(env: str, default: Any, check: Check | None = None, why: str = "") -> Any:
    """Declare a dataclass field read from environment variable `env`."""
    return field(default=default, metadata={"env": env, "check": check, "why": why})


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
    partitions: int = var("KAFKA_PARTITIONS", 3, _positive, "must be > 0")
    replication_factor: int = var("KAFKA_REPLICATION_FACTOR", 1, _positive, "must be > 0")


@dataclass(frozen=True)
class AggregationSettings:
    window_seconds: int = var("AGG_WINDOW_SECONDS", 60, _positive, "must be > 0")
    grace_seconds: float = var("AGG_GRACE_SECONDS", 5.0, _non_negative, "must be >= 0")
    idle_timeout_seconds: float = var("AGG_IDLE_TIMEOUT_SECONDS", 30.0, _positive, "must be > 0")
    idle_check_seconds: float = var("AGG_IDLE_CHECK_SECONDS", 1.0, _positive, "must be > 0")
    batch_max_events: int = var("AGG_BATCH_MAX_EVENTS", 1000, _positive, "must be > 0")
    batch_max_seconds: float = var("AGG_BATCH_MAX_SECONDS", 0.05, _positive, "must be > 0")
    max_future_seconds: float = var(
        "QUOTE_MAX_FUTURE_SECONDS", 300.0, _non_negative, "must be >= 0"
    )
    symbol_pattern: str = var("QUOTE_SYMBOL_PATTERN", r"^[A-Z][A-Z0-9.\-:]{0,19}$")


@dataclass(frozen=True)
class WorkerSettings:
    app_id: str = var("STOCKSTREAM_APP_ID", "stockstream")
    web_host: str = var("STOCKSTREAM_WEB_HOST", "127.0.0.1")
    web_port: int = var("STOCKSTREAM_WEB_PORT", 6066, _port, "must be a TCP port")
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


def _convert(name: str, raw: str, kind: Any, secret: bool) -> Any:
    shown = "<secret>" if secret else repr(raw)
    if isinstance(kind, types.UnionType):  # `X | None`: an empty value already means None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    origin = get_origin(kind)
    if origin is Literal:
        choices = get_args(kind)
        value = raw.strip()
        # Levels are conventionally upper case, formats and guarantees lower case.
        for choice in choices:
            if value.lower() == str(choice).lower():
                return choice
        raise SettingsError(f"{name}: must be one of {', '.join(choices)}, got {shown}")
    if kind is Secret:
        return Secret(raw.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}: expected a boolean (true/false), got {shown}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {shown}") from None
    if kind is float:
        try:
            value_f = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}: expected a number, got {shown}") from None
        if value_f != value_f or value_f in (float("inf"), float("-inf")):
            raise SettingsError(f"{name}: expected a finite number, got {shown}")
        return value_f
    if kind is Path:
        return Path(raw.strip())
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw.strip()


def _read_file_value(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        # The path is not secret, the content is: name the path, never the content.
        raise SettingsError(f"{name}_FILE: cannot read {path!r}: {exc.strerror}") from None


def _build(cls: type[Any], values: Mapping[str, str]) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = _build(kind, values)  # type: ignore[arg-type]
            continue
        name = f.metadata["env"]
        secret = kind is Secret
        raw: str | None
        if values.get(f"{name}_FILE"):
            raw = _read_file_value(name, values[f"{name}_FILE"])
        else:
            raw = values.get(name)
        if raw is None or (raw == "" and not secret):
            continue
        value = _convert(name, raw, kind, secret)
        check: Check | None = f.metadata["check"]
        if check is not None and not check(value):
            shown = "<secret>" if secret else repr(raw)
            raise SettingsError(f"{name}: {f.metadata['why']}, got {shown}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _profile_values(config_dir: Path, env: str, explicit: bool) -> dict[str, str]:
    path = config_dir / f"{env}.yml"
    if not path.exists():
        if explicit and env != "dev":
            raise SettingsError(f"STOCKSTREAM_ENV: profile {path} not found")
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"STOCKSTREAM_ENV: profile {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise SettingsError(f"STOCKSTREAM_ENV: profile {path} must be a mapping of VARIABLE: value")
    return {str(k): "" if v is None else str(v) for k, v in loaded.items()}


def load_settings(
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | Path | None = ".env",
    config_dir: str | Path | None = None,
) -> Settings:
    """Build the settings; raises SettingsError naming the offending variable."""
    process_env = dict(os.environ if environ is None else environ)
    dotenv: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).exists():
        dotenv = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    layered = {**dotenv, **process_env}
    env_raw = layered.get("STOCKSTREAM_ENV", "dev").strip().lower() or "dev"
    if env_raw not in ENVIRONMENTS:
        raise SettingsError(
            f"STOCKSTREAM_ENV: must be one of {', '.join(ENVIRONMENTS)}, got {env_raw!r}"
        )
    directory = Path(config_dir or layered.get("STOCKSTREAM_CONFIG_DIR", "config"))
    profile = _profile_values(directory, env_raw, "STOCKSTREAM_ENV" in layered)
    settings: Settings = _build(Settings, {**profile, **layered})
    try:
        re.compile(settings.aggregation.symbol_pattern)
    except re.error as exc:
        raise SettingsError(
            f"QUOTE_SYMBOL_PATTERN: not a valid regular expression: {exc}"
        ) from None
    worker = settings.worker
    if worker.processing_guarantee == "exactly_once" and not worker.unsafe_faust_exactly_once:
        raise SettingsError(
            "STOCKSTREAM_PROCESSING_GUARANTEE: exactly_once is not supported: with"
            " faust-streaming 0.15 its transactional producers are fenced and windows are lost"
            " (see README, Guarantees); at_least_once already emits each window once"
        )
    return settings


def documented_variables() -> list[tuple[str, str]]:
    """(variable, default) for every setting, for `.env.example` and its test."""
    rows: list[tuple[str, str]] = []

    def walk(cls: type[Any]) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])  # type: ignore[arg-type]
                continue
            default = f.default
            if isinstance(default, Secret) or default is None:
                shown = ""
            elif isinstance(default, tuple):
                shown = ",".join(default)
            else:
                shown = str(default)
            rows.append((f.metadata["env"], shown))

    walk(Settings)
    return rows
