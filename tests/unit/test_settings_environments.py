"""The shipped environments (config/*.yml) and what STOCKSTREAM_ENV=prod refuses at start-up."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stockstream.envconfig import secret_variables
from stockstream.settings import Settings, SettingsError, documented_variables, load_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"

# Where environments really differ: the cluster (addresses, replication, partitions, security),
# the object store's endpoint, the table store and the log format. Anything else differing
# between them would make staging prove nothing about prod.
MAY_DIFFER = {
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_REPLICATION_FACTOR",
    "KAFKA_PARTITIONS",
    "KAFKA_SECURITY_PROTOCOL",
    "S3_ENDPOINT",
    "S3_SECURE",
    "STOCKSTREAM_STORE",
    "LOG_FORMAT",
}


def profile(name: str) -> dict[str, str]:
    loaded = yaml.safe_load((CONFIG / f"{name}.yml").read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in loaded.items()}


def prod(env: dict[str, str]) -> Settings:
    return load_settings(
        environ={"STOCKSTREAM_ENV": "prod", **env}, dotenv_path=None, config_dir=CONFIG
    )


@pytest.mark.parametrize("name", ["dev", "staging", "prod"])
def test_shipped_profile_loads_alone(name: str) -> None:
    settings = load_settings(environ={"STOCKSTREAM_ENV": name}, dotenv_path=None, config_dir=CONFIG)
    assert settings.env == name


def test_profiles_differ_only_where_environments_do() -> None:
    defaults = dict(documented_variables())
    profiles = {name: profile(name) for name in ("dev", "staging", "prod")}
    keys = set().union(*profiles.values())
    assert keys <= defaults.keys(), f"unknown variables: {sorted(keys - defaults.keys())}"
    differing = {
        key
        for key in keys
        if len({values.get(key, defaults[key]) for values in profiles.values()}) > 1
    }
    assert differing <= MAY_DIFFER, f"differ without reason: {sorted(differing - MAY_DIFFER)}"
    # Staging is prod's rehearsal: the same rules; its cluster comes from the deployment.
    assert profiles["staging"] == profiles["prod"]


def test_no_profile_holds_a_secret() -> None:
    for name in ("dev", "staging", "prod"):
        assert set(profile(name)) & set(secret_variables(Settings)) == set()


def test_prod_refuses_an_unreplicated_topic() -> None:
    with pytest.raises(SettingsError, match=r"^KAFKA_REPLICATION_FACTOR: must be >= 2"):
        prod({"KAFKA_REPLICATION_FACTOR": "1"})
    assert prod({"KAFKA_REPLICATION_FACTOR": "2"}).kafka.replication_factor == 2


def test_staging_and_dev_do_not_apply_prods_rules() -> None:
    for name in ("dev", "staging"):
        settings = load_settings(
            environ={
                "STOCKSTREAM_ENV": name,
                "KAFKA_REPLICATION_FACTOR": "1",
                "FINNHUB_API_KEY": "k",
                "STOCKSTREAM_WEB_HOST": "0.0.0.0",
            },
            dotenv_path=None,
            config_dir=CONFIG,
        )
        assert settings.kafka.replication_factor == 1


def test_every_secret_setting_is_known() -> None:
    # The refusal below covers these; a new Secret setting joins it by its type alone.
    assert {
        "FINNHUB_API_KEY",
        "S3_SECRET_KEY",
        "KAFKA_SASL_PASSWORD",
        "STOCKSTREAM_WEB_TOKEN",
        "ALERT_SLACK_WEBHOOK_URL",
    } <= set(secret_variables(Settings))


@pytest.mark.parametrize("name", secret_variables(Settings))
def test_prod_refuses_a_secret_given_as_a_plain_value(name: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        prod({name: "hunter2-value"})
    message = str(info.value)
    assert message.startswith(f"{name}: a plain value is refused") and f"{name}_FILE" in message
    assert "hunter2" not in message
    secret_file = tmp_path / "secret"
    secret_file.write_text("hunter2-value\n")
    env = {f"{name}_FILE": str(secret_file)}
    if name == "KAFKA_SASL_PASSWORD":  # only read together with a SASL protocol and user
        env |= {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"}
    if name == "KAFKA_SSL_KEY_PASSWORD":  # only meaningful with TLS and a client certificate
        cert = tmp_path / "client.pem"
        cert.write_text("")
        env |= {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": str(cert)}
    prod(env)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "worker.example.internal"])
def test_prod_refuses_an_open_web_view_without_a_token(host: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^STOCKSTREAM_WEB_HOST: .*STOCKSTREAM_WEB_TOKEN"):
        prod({"STOCKSTREAM_WEB_HOST": host})
    token = tmp_path / "token"
    token.write_text("t0ken")
    assert prod({"STOCKSTREAM_WEB_HOST": host, "STOCKSTREAM_WEB_TOKEN_FILE": str(token)})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_prod_serves_loopback_without_a_token(host: str) -> None:
    assert prod({"STOCKSTREAM_WEB_HOST": host}).worker.web_host == host


def test_readme_settings_table_is_the_generated_one() -> None:
    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "scripts" / "settings_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated: str = module.table(CONFIG)
    assert module.readme_table((ROOT / "README.md").read_text(encoding="utf-8")) == generated
    # One row per setting, and a profile's value shows in its column.
    rows = [line for line in generated.splitlines() if line.startswith("| `")]
    assert len(rows) == len(documented_variables())
    (row,) = [r for r in rows if r.startswith("| `KAFKA_REPLICATION_FACTOR` |")]
    assert row == "| `KAFKA_REPLICATION_FACTOR` | `1` | `1` | `3` | `3` |"


def test_the_command_stops_on_a_refused_prod_value(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "STOCKSTREAM_ENV": "prod",
        "STOCKSTREAM_CONFIG_DIR": str(CONFIG),
        "KAFKA_REPLICATION_FACTOR": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "stockstream.cli", "config"],
        cwd=tmp_path,  # no .env here
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: KAFKA_REPLICATION_FACTOR: must be >= 2")
