"""Shared fixtures. Integration fixtures start real services (scripts/kafka.sh)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real single-node Kafka broker (KRaft) for the whole test session.

    Uses KAFKA_TEST_BOOTSTRAP if set (an already running broker), else starts one with
    scripts/kafka.sh on KAFKA_TEST_PORT (default 19092) and stops it afterwards.
    """
    existing = os.environ.get("KAFKA_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    port = os.environ.get("KAFKA_TEST_PORT", "19092")
    env = {**os.environ, "KAFKA_PORT": port, "KAFKA_CONTROLLER_PORT": str(int(port) + 1000)}
    script = str(ROOT / "scripts" / "kafka.sh")
    subprocess.run([script, "start"], check=True, env=env, timeout=300)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop"], check=False, env=env, timeout=120)
