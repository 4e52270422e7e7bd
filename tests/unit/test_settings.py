"""Configuration: precedence, profiles, secrets as files, errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockstream.envconfig import redact_url
from stockstream.logs import JsonFormatter
from stockstream.settings import SettingsError, documented_variables, load_settings

ROOT = Path(__file__).resolve().parents[2]


def load(
    env: dict[str, str], tmp_path: Path, dotenv: str = "", profile: str = "", name: str = "dev"
) -> object:
    (tmp_path / ".env").write_text(dotenv)
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    if profile:
        (config / f"{name}.yml").write_text(profile)
    return load_settings(environ=env, dotenv_path=tmp_path / ".env", config_dir=config)


def test_defaults(tmp_path: Path) -> None:
    s = load({}, tmp_path)
    assert s.kafka.quotes_topic == "stock-quotes"  # type: ignore[attr-defined]
    assert s.aggregation.grace_seconds == 5.0  # type: ignore[attr-defined]


def test_precedence_env_over_dotenv_over_profile(tmp_path: Path) -> None:
    profile = "KAFKA_PARTITIONS: 6\nAGG_GRACE_SECONDS: 9\nLOG_FORMAT: text\n"
    s = load(
        {"STOCKSTREAM_ENV": "staging", "KAFKA_PARTITIONS": "12"},
        tmp_path,
        dotenv="AGG_GRACE_SECONDS=7\n",
        profile=profile,
        name="staging",
    )
    assert s.kafka.partitions == 12  # type: ignore[attr-defined]
    assert s.aggregation.grace_seconds == 7.0  # type: ignore[attr-defined]
    assert s.log.format == "text"  # type: ignore[attr-defined]
    assert s.env == "staging"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_PARTITIONS": "abc"}, "KAFKA_PARTITIONS: expected an integer"),
        ({"KAFKA_PARTITIONS": "0"}, "KAFKA_PARTITIONS: must be > 0"),
        ({"AGG_GRACE_SECONDS": "nan"}, "AGG_GRACE_SECONDS: expected a finite number"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT: must be one of json, text"),
        ({"STOCKSTREAM_ENV": "qa"}, "STOCKSTREAM_ENV: must be one of"),
        ({"STOCKSTREAM_ENV": "prod"}, "STOCKSTREAM_ENV: profile"),
        ({"STOCKSTREAM_WEB_PORT": "70000"}, "STOCKSTREAM_WEB_PORT: must be a TCP port"),
        ({"QUOTE_SYMBOL_PATTERN": "("}, "QUOTE_SYMBOL_PATTERN: not a valid regular expression"),
        (
            {"STOCKSTREAM_PROCESSING_GUARANTEE": "exactly_once"},
            "STOCKSTREAM_PROCESSING_GUARANTEE: exactly_once is not supported",
        ),
        (
            {"ARCHIVE_BACKOFF_INITIAL_SECONDS": "60", "ARCHIVE_BACKOFF_MAX_SECONDS": "30"},
            "ARCHIVE_BACKOFF_INITIAL_SECONDS: must not exceed ARCHIVE_BACKOFF_MAX_SECONDS",
        ),
        (
            {"FINNHUB_BACKOFF_INITIAL_SECONDS": "31"},
            "FINNHUB_BACKOFF_INITIAL_SECONDS: must not exceed FINNHUB_BACKOFF_MAX_SECONDS",
        ),
    ],
)
def test_invalid_values_name_the_variable(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load(env, tmp_path)


def test_secret_from_file_never_printed(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("s3cr3t-value\n")
    s = load({"FINNHUB_API_KEY_FILE": str(secret)}, tmp_path)
    assert s.finnhub.api_key.reveal() == "s3cr3t-value"  # type: ignore[attr-defined]
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s)


def test_missing_secret_file_names_variable_not_content(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="FINNHUB_API_KEY_FILE: cannot read"):
        load({"FINNHUB_API_KEY_FILE": str(tmp_path / "absent")}, tmp_path)


def test_invalid_secret_value_is_not_echoed(tmp_path: Path) -> None:
    # A non-secret with a bad value is echoed (helps the user); secrets are masked.
    with pytest.raises(SettingsError) as info:
        load({"KAFKA_PARTITIONS": "s3cr3t"}, tmp_path)
    assert "'s3cr3t'" in str(info.value)


def test_env_example_documents_every_variable() -> None:
    text = (ROOT / ".env.example").read_text()
    missing = [name for name, _ in documented_variables() if f"{name}=" not in text]
    assert missing == []


def test_profiles_shipped_are_valid() -> None:
    for name in ("dev", "staging", "prod"):
        s = load_settings(
            environ={"STOCKSTREAM_ENV": name}, dotenv_path=None, config_dir=ROOT / "config"
        )
        assert s.env == name


def test_json_log_line_carries_context() -> None:
    import json
    import logging

    record = logging.LogRecord(
        "stockstream.x", logging.WARNING, __file__, 1, "dead-lettered", None, None
    )
    record.symbol, record.partition, record.offset, record.topic = "AAPL", 2, 41, "stock-quotes"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["message"] == "dead-lettered"
    assert (line["symbol"], line["partition"], line["offset"], line["topic"]) == (
        "AAPL",
        2,
        41,
        "stock-quotes",
    )
    assert line["time"].endswith("+00:00")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("wss://ws.finnhub.io?token=abc", "wss://ws.finnhub.io?token=***"),
        ("https://user:pw@minio:9000/x?sig=1&a=", "https://user:***@minio:9000/x?sig=***&a=***"),
        ("https://TOKEN@host/p", "https://***@host/p"),
        ("127.0.0.1:9092,127.0.0.1:9093", "127.0.0.1:9092,127.0.0.1:9093"),
        ("http://[::1:9000", "***"),
    ],
)
def test_urls_in_settings_are_shown_without_tokens(text: str, shown: str) -> None:
    assert redact_url(text) == shown


@pytest.mark.parametrize("name", ["AGG_BATCH_MAX_EVENTS", "AGG_BATCH_MAX_SECONDS"])
def test_a_retired_setting_stops_the_start_up_instead_of_being_ignored(name: str) -> None:
    with pytest.raises(SettingsError, match=f"{name}: no longer read: .*fetched batch"):
        load_settings({name: "5000"}, dotenv_path=None)
