"""Kafka connection security end to end: a broker of our own with SASL_PLAINTEXT, SSL
(client certificate required) and SASL_SSL listeners (scripts/kafka.sh, KAFKA_SECURITY=all),
and every client of the project going through them.

- The worker (`faust -A stockstream worker`: the aggregation, the archive and the warehouse
  consumers) and `stockstream produce` work through SCRAM-SHA-512 (password as
  KAFKA_SASL_PASSWORD_FILE), PLAIN, SCRAM-SHA-256 over SASL_SSL and mutual TLS (client key
  encrypted, its password as KAFKA_SSL_KEY_PASSWORD_FILE): every produced quote is archived,
  every window is emitted once and loaded into the warehouse.
- A wrong password stops the worker within seconds, and `stockstream produce|topics|tail|dlq
  redrive` with a non-zero exit, each with a message naming what to check; no retry loop,
  nothing spooled. A broker that is down is still an outage: the producer spools.
- No password ever appears in a log, in the commands' output or in `stockstream config`.

The broker's PLAINTEXT listener (kept beside the secured ones) is how the tests read topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port
from tests.integration.harness import Stack, Worker, read_all

pytestmark = pytest.mark.integration

KAFKA_SH = ROOT / "scripts" / "kafka.sh"
SCRAM_USER = "stockstream"
PLAIN_USER = "plainuser"
QUOTES = 400


@dataclass
class SecureBroker:
    plaintext: str
    sasl: str
    ssl: str
    sasl_ssl: str
    tls_dir: Path
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    kafka_dir = tmp_path_factory.mktemp("kafka-security")
    port, controller, sasl, ssl, sasl_ssl = (free_port() for _ in range(5))
    passwords = {SCRAM_USER: f"scram-{uuid.uuid4().hex}", PLAIN_USER: f"plain-{uuid.uuid4().hex}"}
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(controller),
        "KAFKA_SASL_PORT": str(sasl),
        "KAFKA_SSL_PORT": str(ssl),
        "KAFKA_SASL_SSL_PORT": str(sasl_ssl),
        "KAFKA_SECURITY": "all",
        "KAFKA_SASL_USERS": ",".join(f"{u}:{p}" for u, p in passwords.items()),
        "KAFKA_DIR": str(kafka_dir),
        # The jars of the default broker dir, fetched there once and shared.
        "KAFKA_LIBS_DIR": str(ROOT / ".local" / "kafka" / "libs"),
    }
    started = subprocess.run(
        [str(KAFKA_SH), "start"], env=env, capture_output=True, text=True, timeout=300
    )
    assert started.returncode == 0, started.stderr
    # One address per listener, the PLAINTEXT one first.
    assert started.stdout.split() == [
        f"127.0.0.1:{port}",
        f"SASL_PLAINTEXT://127.0.0.1:{sasl}",
        f"SSL://127.0.0.1:{ssl}",
        f"SASL_SSL://127.0.0.1:{sasl_ssl}",
    ]
    try:
        yield SecureBroker(
            plaintext=f"127.0.0.1:{port}",
            sasl=f"127.0.0.1:{sasl}",
            ssl=f"127.0.0.1:{ssl}",
            # A host name, so the check of the broker's name in its certificate is exercised.
            sasl_ssl=f"localhost:{sasl_ssl}",
            tls_dir=kafka_dir / f"tls-{port}",
            passwords=passwords,
        )
    finally:
        subprocess.run([str(KAFKA_SH), "stop"], env=env, check=False, timeout=120)


def secret_file(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def security_env(mode: str, broker: SecureBroker, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(bootstrap, settings) of one way to connect."""
    scram_password = secret_file(tmp_path, "scram-password", broker.passwords[SCRAM_USER])
    ca = str(broker.tls_dir / "ca.pem")
    if mode == "scram-sha-512":
        return broker.sasl, {
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": SCRAM_USER,
            "KAFKA_SASL_PASSWORD_FILE": str(scram_password),
        }
    if mode == "plain":
        return broker.sasl, {
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": PLAIN_USER,
            "KAFKA_SASL_PASSWORD": broker.passwords[PLAIN_USER],
        }
    if mode == "sasl_ssl-scram-sha-256":
        return broker.sasl_ssl, {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "KAFKA_SASL_USERNAME": SCRAM_USER,
            "KAFKA_SASL_PASSWORD_FILE": str(scram_password),
            "KAFKA_SSL_CAFILE": ca,
        }
    assert mode == "mtls"
    # The client key, encrypted: its password comes from a file too.
    key_password = f"key-{uuid.uuid4().hex}"
    encrypted = tmp_path / "client-encrypted.key"
    subprocess.run(
        [
            "openssl", "pkey", "-in", str(broker.tls_dir / "client.key"), "-aes256",
            "-passout", f"pass:{key_password}", "-out", str(encrypted),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return broker.ssl, {
        "KAFKA_SECURITY_PROTOCOL": "SSL",
        "KAFKA_SSL_CAFILE": ca,
        "KAFKA_SSL_CERTFILE": str(broker.tls_dir / "client.pem"),
        "KAFKA_SSL_KEYFILE": str(encrypted),
        "KAFKA_SSL_KEY_PASSWORD_FILE": str(secret_file(tmp_path, "key-password", key_password)),
    }


def stack_for(bootstrap: str, security: dict[str, str], tmp_path: Path) -> Stack:
    return Stack(
        bootstrap,
        tmp_path / "data",
        extra_env={
            **security,
            "ARCHIVE_BATCH_SECONDS": "1",
            "WAREHOUSE_BATCH_SECONDS": "0.5",
            "PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
            "PRODUCER_REQUEST_TIMEOUT_MS": "5000",
        },
    )


def stockstream(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds) of a `stockstream` command."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "stockstream.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def metric(text: str, name: str) -> float:
    """Sum of every sample of `name` in a Prometheus text page."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


def logged(output: str, message: str) -> dict[str, Any]:
    """The (JSON) log record with `message` in a command's output."""
    for line in output.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == message:
                return dict(record)
    raise AssertionError(f"no {message!r} in:\n{output[-3000:]}")


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, "a secret reached the output"


@pytest.mark.parametrize("mode", ["scram-sha-512", "plain", "sasl_ssl-scram-sha-256", "mtls"])
def test_worker_and_producer_through_secured_listener(
    broker: SecureBroker, tmp_path: Path, mode: str
) -> None:
    bootstrap, security = security_env(mode, broker, tmp_path)
    stack = stack_for(bootstrap, security, tmp_path)
    env = stack.env(free_port())
    secrets = [*broker.passwords.values()]
    if "KAFKA_SSL_KEY_PASSWORD_FILE" in security:
        secrets.append(Path(security["KAFKA_SSL_KEY_PASSWORD_FILE"]).read_text().strip())

    code, shown, _ = stockstream(env, "config")
    assert code == 0, shown
    config = json.loads(shown)["kafka"]
    assert config["security_protocol"] == security["KAFKA_SECURITY_PROTOCOL"]
    if "KAFKA_SASL_USERNAME" in security:
        assert config["sasl_password"] == "***"
    assert_no_secret(shown, *secrets)

    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        code, out, _ = stockstream(
            env, "produce", "--source", "simulate", "--fast", "--count", str(QUOTES)
        )
        assert code == 0, out
        assert logged(out, "producer done")["sent"] == QUOTES
        assert_no_secret(out, *secrets)

        # What was produced, read back through the PLAINTEXT listener.
        quotes = asyncio.run(read_all(broker.plaintext, stack.quotes, until=QUOTES, settle=0))
        assert len(quotes) == QUOTES
        expected = {
            (v["symbol"], v["market_timestamp"] // 60_000 * 60_000) for _, _, _, v, _ in quotes
        }
        # Windows close on the idle timeout (3 s) and reach the warehouse in batches.
        windows = asyncio.run(read_all(broker.plaintext, stack.aggregated, until=len(expected)))
        assert sorted((v["symbol"], v["window_start_ms"]) for *_, v, _ in windows) == sorted(
            expected
        )
        deadline = time.monotonic() + 60
        rows = archived = 0.0
        while time.monotonic() < deadline:
            _, page = worker.get("/metrics/")
            rows = metric(page, "stockstream_warehouse_rows_total")
            archived = metric(page, "stockstream_archive_records_total")
            if rows >= len(expected) and archived >= QUOTES:
                break
            time.sleep(0.5)
        assert rows == len(expected), f"warehouse rows {rows}, windows {len(expected)}"
        assert archived == QUOTES, f"archived {archived} of {QUOTES} quotes"
    finally:
        worker.stop()
    assert_no_secret(worker.log_path.read_text(errors="replace"), *secrets)


def wrong_password_env(broker: SecureBroker, tmp_path: Path) -> tuple[dict[str, str], str]:
    wrong = f"wrong-{uuid.uuid4().hex}"
    _, security = security_env("scram-sha-512", broker, tmp_path)
    security["KAFKA_SASL_PASSWORD_FILE"] = str(secret_file(tmp_path, "wrong-password", wrong))
    stack = stack_for(broker.sasl, security, tmp_path)
    return stack.env(free_port()), wrong


REFUSED = (
    f"Kafka at {{}} refused the credentials of user '{SCRAM_USER}' (SCRAM-SHA-512):"
    " Authentication failed"
)
CHECK = "Check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)"


def test_wrong_password_stops_the_worker_at_once(broker: SecureBroker, tmp_path: Path) -> None:
    env, wrong = wrong_password_env(broker, tmp_path)
    log_path = tmp_path / "worker.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "stockstream", "worker", "-l", "info"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            code = worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    elapsed = time.monotonic() - started
    text = log_path.read_text(errors="replace")
    assert code != 0, text[-3000:]
    # Python start-up and Faust's imports included; a retry loop would never end.
    assert elapsed < 20, f"worker took {elapsed:.1f}s to give up"
    assert REFUSED.format(broker.sasl) in text
    assert CHECK in text
    assert text.count("Unable connect to") <= 2, "the worker retried the connection"
    assert_no_secret(text, wrong, *broker.passwords.values())
    print(f"worker with a wrong password exited with {code} after {elapsed:.2f}s")


def test_wrong_password_fails_every_command(broker: SecureBroker, tmp_path: Path) -> None:
    env, wrong = wrong_password_env(broker, tmp_path)
    commands = [
        ("produce", "--source", "simulate", "--fast", "--count", "50"),
        ("topics",),
        ("tail", "quotes"),
        ("dlq", "redrive", "--any-reason"),
    ]
    for args in commands:
        code, out, elapsed = stockstream(env, *args, timeout=60)
        assert code == 1, f"{args}: {out}"
        assert f"stockstream {args[0]}: " + REFUSED.format(broker.sasl) in out, out
        assert CHECK in out
        assert elapsed < 15, f"{args} took {elapsed:.1f}s"
        assert_no_secret(out, wrong, *broker.passwords.values())
        print(f"stockstream {' '.join(args)}: exit {code} after {elapsed:.2f}s")
    # Nothing was spooled for a broker that refused us.
    spool = Path(env["PRODUCER_SPOOL_DIR"])
    assert not spool.exists() or not any(p.is_file() and p.stat().st_size for p in spool.rglob("*"))


def test_a_broker_that_is_down_is_still_an_outage(tmp_path: Path) -> None:
    """Secured settings, nothing listening: the producer spools and exits 0, as it always
    did -- being unreachable is not being refused."""
    stack = stack_for(
        f"127.0.0.1:{free_port()}",
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_USERNAME": SCRAM_USER,
            "KAFKA_SASL_PASSWORD": "whatever",
        },
        tmp_path,
    )
    code, out, elapsed = stockstream(
        stack.env(free_port()), "produce", "--source", "simulate", "--fast", "--count", "50"
    )
    assert code == 0, out
    done = logged(out, "producer done")
    assert (done["sent"], done["spooled"]) == (0, 50)
    assert "refused" not in out
    assert elapsed < 30
