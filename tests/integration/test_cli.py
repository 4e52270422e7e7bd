"""The `stockstream` command as users run it (a real process, a real broker): configuration
shown with secrets masked, topics created and listed, the DLQ re-drive under its name and its
old one, and `tail` printing a topic's records."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def cli_env(bootstrap: str, tmp_path: Path) -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_QUOTES_TOPIC": f"cli-quotes-{run}",
        "KAFKA_AGGREGATED_TOPIC": f"cli-agg-{run}",
        "KAFKA_DLQ_TOPIC": f"cli-dlq-{run}",
        "STOCKSTREAM_APP_ID": f"cli-{run}",
        "STOCKSTREAM_DATA_DIR": str(tmp_path / "data"),
        "ARCHIVE_LOCAL_DIR": str(tmp_path / "archive"),
        "FINNHUB_API_KEY": "cli-secret-key",
        # URLs may carry a token or a password too (a mistake, but a common one).
        "FINNHUB_WS_URL": "wss://ws.finnhub.io?token=url-secret-token",
        "BQ_API_ENDPOINT": "https://loader:url-secret-password@bq.example:443",
        "LOG_FORMAT": "json",
    }


def stockstream(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockstream.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_masks_secrets_and_a_bad_value_names_the_variable(tmp_path: Path) -> None:
    env = cli_env("127.0.0.1:1", tmp_path)
    shown = stockstream(env, "config")
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    assert config["finnhub"]["api_key"] == "***"
    assert config["kafka"]["quotes_topic"] == env["KAFKA_QUOTES_TOPIC"]
    assert "cli-secret-key" not in shown.stdout + shown.stderr
    assert "url-secret" not in shown.stdout + shown.stderr
    assert config["finnhub"]["ws_url"] == "wss://ws.finnhub.io?token=***"
    assert config["warehouse"]["bq_api_endpoint"] == "https://loader:***@bq.example:443"
    refused = stockstream({**env, "KAFKA_PARTITIONS": "many"}, "config")
    assert refused.returncode == 2
    assert "configuration error: KAFKA_PARTITIONS: expected an integer" in refused.stderr


def test_topics_then_redrive_under_both_names_then_tail(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = cli_env(kafka_bootstrap, tmp_path)
    created = stockstream(env, "topics")
    assert created.returncode == 0, created.stderr
    listed = dict(line.split("\t") for line in created.stdout.splitlines())
    assert listed[env["KAFKA_QUOTES_TOPIC"]] == "3 partitions"
    assert listed[env["KAFKA_DLQ_TOPIC"]] == "3 partitions"
    for name in ("redrive", "replay"):
        done = stockstream(env, "dlq", name, "--any-reason")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "re-drove 0 dead-lettered record(s)"

    tail = subprocess.Popen(
        [sys.executable, "-m", "stockstream.cli", "tail", "quotes", "--from-beginning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:

        async def send() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(
                    env["KAFKA_QUOTES_TOPIC"], key=b"AAPL", value=b'{"hello": 1}', partition=1
                )
            finally:
                await producer.stop()

        asyncio.run(send())
        assert tail.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and not line:
            line = tail.stdout.readline().strip()
        assert line == '1:0\t{"hello": 1}'
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=30) == 0
