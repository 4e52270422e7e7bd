"""Kafka connection security without a broker: the settings and their cross-checks, the
arguments every client gets (aiokafka and Faust alike), and the classification of failures
into access errors (fatal, with what to check) and outages (left to retry)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from stockstream.kafka import clients
from stockstream.kafka.clients import KafkaAccessError
from stockstream.settings import KafkaSettings, Settings, SettingsError, load_settings
from tests.conftest import free_port

PASSWORD = "pa55-w0rd-never-shown"


def load(env: dict[str, str]) -> Settings:
    return load_settings(environ=env, dotenv_path=None, config_dir="/nonexistent")


def sasl(protocol: str = "SASL_PLAINTEXT", **extra: str) -> dict[str, str]:
    return {
        "KAFKA_SECURITY_PROTOCOL": protocol,
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": PASSWORD,
        **extra,
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate whose key is
    encrypted with "key-secret" (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
        "-out", "ca.pem", "-subj", "/CN=test CA", "-addext", "basicConstraints=critical,CA:TRUE",
    )  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out",
            f"{who}.csr", "-subj", f"/CN={who}",
        )  # fmt: skip
        ext = ["-extfile", "server.ext"] if who == "server" else []
        openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{who}.pem", *ext,
        )  # fmt: skip
    openssl(
        "pkey", "-in", "client.key", "-aes256", "-passout", "pass:key-secret",
        "-out", "client-encrypted.key",
    )  # fmt: skip
    (d / "not-pem.txt").write_text("hello\n")
    yield {p.stem.replace("-", "_") + p.suffix.replace(".", "_"): p for p in d.iterdir()}


# ---------------------------------------------------------------------- settings


def test_defaults_are_plaintext() -> None:
    kafka = load({}).kafka
    assert kafka.security_protocol == "PLAINTEXT"
    assert kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.ssl_check_hostname is True
    assert (kafka.uses_sasl, kafka.uses_tls) == (False, False)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL: must be one of PLAINTEXT"),
        (sasl(KAFKA_SASL_MECHANISM="GSSAPI"), "KAFKA_SASL_MECHANISM: must be one of"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            "KAFKA_SASL_USERNAME: required with KAFKA_SECURITY_PROTOCOL=SASL_SSL",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "svc"},
            "KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE): required with"
            " KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        ),
        (
            {"KAFKA_SASL_USERNAME": "svc"},
            "KAFKA_SASL_USERNAME: set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not"
            " authenticate with SASL",
        ),
        (
            sasl("SSL", KAFKA_SSL_CAFILE=""),
            "KAFKA_SASL_USERNAME: set, but KAFKA_SECURITY_PROTOCOL=SSL does not authenticate",
        ),
        (
            {"KAFKA_SASL_PASSWORD": PASSWORD},
            "KAFKA_SASL_PASSWORD: set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT",
        ),
        (
            {"KAFKA_SSL_CAFILE": "/etc/hostname"},
            "KAFKA_SSL_CAFILE: set, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS",
        ),
        (
            sasl(KAFKA_SSL_KEY_PASSWORD="x"),
            "KAFKA_SSL_KEY_PASSWORD: set, but KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
            "KAFKA_SSL_CAFILE: cannot read '/nonexistent/ca.pem': No such file or directory",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": "/etc/hostname"},
            "KAFKA_SSL_KEYFILE: set without KAFKA_SSL_CERTFILE",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEY_PASSWORD": "x"},
            "KAFKA_SSL_KEY_PASSWORD: set without KAFKA_SSL_CERTFILE",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CHECK_HOSTNAME": "perhaps"},
            "KAFKA_SSL_CHECK_HOSTNAME: expected a boolean",
        ),
        (
            sasl(KAFKA_SASL_PASSWORD_FILE="/nonexistent/password"),
            "KAFKA_SASL_PASSWORD_FILE: cannot read '/nonexistent/password'",
        ),
    ],
)
def test_security_settings_that_cannot_work_name_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load(env)
    assert message in str(info.value)
    assert PASSWORD not in str(info.value)


def test_password_from_file_is_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "kafka-password"
    path.write_text(PASSWORD + "\n")
    env = sasl("sasl_ssl", KAFKA_SASL_MECHANISM="scram-sha-256")
    del env["KAFKA_SASL_PASSWORD"]
    kafka = load({**env, "KAFKA_SASL_PASSWORD_FILE": str(path)}).kafka
    assert kafka.security_protocol == "SASL_SSL"
    assert kafka.sasl_mechanism == "SCRAM-SHA-256"
    assert kafka.sasl_password.reveal() == PASSWORD
    assert PASSWORD not in repr(kafka) and PASSWORD not in str(kafka)


# ---------------------------------------------------------------------- client arguments


def test_plaintext_connection() -> None:
    kafka = load({"KAFKA_BOOTSTRAP_SERVERS": "a:9092, b:9093,"}).kafka
    assert clients.connection(kafka) == {
        "bootstrap_servers": ["a:9092", "b:9093"],
        "security_protocol": "PLAINTEXT",
    }
    assert clients.faust_credentials(kafka) is None


def test_sasl_plaintext_connection() -> None:
    kafka = load(sasl(KAFKA_SASL_MECHANISM="PLAIN")).kafka
    assert clients.connection(kafka) == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "svc",
        "sasl_plain_password": PASSWORD,
    }


def test_sasl_ssl_connection_has_one_verifying_context(pki: dict[str, Path]) -> None:
    kafka = load(sasl("SASL_SSL", KAFKA_SSL_CAFILE=str(pki["ca_pem"]))).kafka
    options = clients.connection(kafka)
    context = options.pop("ssl_context")
    assert options == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": PASSWORD,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert clients.connection(kafka)["ssl_context"] is context  # built once


def test_ssl_without_hostname_check_still_verifies_the_chain(pki: dict[str, Path]) -> None:
    kafka = load(
        {
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": str(pki["ca_pem"]),
            "KAFKA_SSL_CHECK_HOSTNAME": "false",
            "KAFKA_SSL_CERTFILE": str(pki["client_pem"]),
            "KAFKA_SSL_KEYFILE": str(pki["client_encrypted_key"]),
            "KAFKA_SSL_KEY_PASSWORD": "key-secret",
        }
    ).kafka
    context = clients.connection(kafka)["ssl_context"]
    assert not context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert clients.connection(kafka)["security_protocol"] == "SSL"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"KAFKA_SSL_CAFILE": "not_pem_txt"}, "KAFKA_SSL_CAFILE: "),
        (
            {"KAFKA_SSL_CERTFILE": "client_pem", "KAFKA_SSL_KEYFILE": "client_encrypted_key"},
            "KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE / KAFKA_SSL_KEY_PASSWORD",
        ),
        (
            {"KAFKA_SSL_CERTFILE": "client_pem", "KAFKA_SSL_KEYFILE": "server_key"},
            "the client certificate and key cannot be loaded",
        ),
    ],
)
def test_unusable_tls_files_name_the_variable(
    pki: dict[str, Path], files: dict[str, str], message: str
) -> None:
    env = {"KAFKA_SECURITY_PROTOCOL": "SSL", **{k: str(pki[v]) for k, v in files.items()}}
    if "KAFKA_SSL_KEYFILE" in env:
        env["KAFKA_SSL_KEY_PASSWORD"] = "wrong-key-secret"
    kafka = load(env).kafka
    with pytest.raises(SettingsError, match=message):
        clients.connection(kafka)


@pytest.mark.parametrize("protocol", ["SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_gets_the_same_security_as_every_other_client(
    pki: dict[str, Path], protocol: str
) -> None:
    env = sasl(protocol) if protocol.startswith("SASL") else {"KAFKA_SECURITY_PROTOCOL": protocol}
    if protocol.endswith("SSL"):
        env["KAFKA_SSL_CAFILE"] = str(pki["ca_pem"])
    kafka = load(env).kafka
    faust_side = credentials_to_aiokafka_auth(clients.faust_credentials(kafka))
    ours = clients.security(kafka)
    assert {k: v for k, v in faust_side.items() if v is not None} == ours


# ---------------------------------------------------------------------- access failures


def test_classification_names_what_to_check() -> None:
    kafka = load(sasl()).kafka
    cases: list[tuple[BaseException, str]] = [
        (
            SaslAuthenticationFailed("Authentication failed: Invalid username or password"),
            "refused the credentials of user 'svc' (SCRAM-SHA-512): Authentication failed:"
            " Invalid username or password. Check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"
            " (or KAFKA_SASL_PASSWORD_FILE) and KAFKA_SASL_MECHANISM",
        ),
        (UnsupportedSaslMechanismError("no"), "Check KAFKA_SASL_MECHANISM"),
        (IllegalSaslStateError("x"), "Check KAFKA_SECURITY_PROTOCOL"),
        (TopicAuthorizationFailedError("t"), "Check the ACLs granted to KAFKA_SASL_USERNAME"),
        (
            ssl.SSLCertVerificationError(1, "certificate verify failed"),
            "Check KAFKA_SSL_CAFILE",
        ),
    ]
    for exc, message in cases:
        found = clients.access_error(exc, kafka, "k1:9093")
        assert isinstance(found, KafkaAccessError), exc
        assert message in str(found)
        assert PASSWORD not in str(found)
    for outage in (
        KafkaConnectionError("Unable to bootstrap"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
    ):
        assert clients.access_error(outage, kafka) is None


async def test_a_broker_that_is_down_is_not_an_access_failure() -> None:
    kafka = load(sasl(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")).kafka
    admin = clients.admin(kafka)
    with pytest.raises(KafkaConnectionError):
        await clients.start(admin, kafka)
    await admin.close()
    assert await clients.diagnose(kafka) is None


async def serve(handler: Any, context: ssl.SSLContext | None = None) -> asyncio.Server:
    return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)


async def test_a_proxy_that_drops_connections_is_an_outage() -> None:
    """Like a container port whose broker is down: accepted, then closed at once."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with await serve(drop) as server:
        port = server.sockets[0].getsockname()[1]
        kafka = load({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}).kafka
        assert await clients.diagnose(kafka) is None


async def test_plaintext_client_at_a_tls_port_is_told_to_use_tls(pki: dict[str, Path]) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_pem"], pki["server_key"])

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with await serve(drop, context) as server:
        port = server.sockets[0].getsockname()[1]
        kafka = load({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}).kafka
        found = await clients.diagnose(kafka)
        assert found is not None
        assert "expects TLS, but KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in str(found)

        # The same port with TLS but without trusting its CA: the certificate is the problem.
        untrusting = load(
            {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "KAFKA_SECURITY_PROTOCOL": "SSL"}
        ).kafka
        found = await clients.diagnose(untrusting)
        assert found is not None
        assert "the broker's certificate is not trusted" in str(found)
        assert "Check KAFKA_SSL_CAFILE" in str(found)


# ---------------------------------------------------------------------- fatal, not retried


async def test_consumer_service_runner_stops_on_an_access_error() -> None:
    from stockstream.kafka.consumer_service import ConsumerServiceRunner

    class Refused:
        name = "refused"
        topic = "t"
        runs = 0

        async def run(self) -> None:
            self.runs += 1
            raise KafkaAccessError("Kafka refused the credentials")

    service = Refused()
    runner = ConsumerServiceRunner(service)  # type: ignore[arg-type]
    await runner.start()
    try:
        for _ in range(100):
            if runner.crashed:
                break
            await asyncio.sleep(0.02)
        assert runner.crashed
        assert isinstance(runner.crash_reason, KafkaAccessError)
        assert service.runs == 1  # not restarted
    finally:
        await runner.stop()


async def test_quote_producer_refused_after_an_outage_keeps_its_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker was down at start (records spooled); when it answers but refuses us, the
    producer stops retrying and the next send raises. The spool keeps the records."""
    from stockstream.producer import quote_producer
    from stockstream.producer.quote_producer import QuoteProducer

    attempts: list[BaseException] = [KafkaConnectionError("Unable to bootstrap")]

    async def open_session(*args: Any, **kwargs: Any) -> Any:
        raise attempts.pop(0) if attempts else KafkaAccessError("refused: check the password")

    monkeypatch.setattr(quote_producer, "open_session", open_session)
    settings = load(
        {"PRODUCER_SPOOL_DIR": str(tmp_path / "spool"), "PRODUCER_SPOOL_RETRY_SECONDS": "0.05"}
    )
    producer = QuoteProducer(settings)
    async with producer:
        await producer.send_raw(b"AAPL", b"{}")  # spooled: the broker is away
        with pytest.raises(KafkaAccessError, match="check the password"):
            for _ in range(200):
                await producer.send_raw(b"AAPL", b"{}")
                await asyncio.sleep(0.01)
        assert producer.spool_pending >= 1
        with pytest.raises(KafkaAccessError):
            await producer.flush()
    assert producer.spool_pending >= 1


async def test_quote_producer_refused_at_start_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stockstream.producer import quote_producer
    from stockstream.producer.quote_producer import QuoteProducer

    async def open_session(*args: Any, **kwargs: Any) -> Any:
        raise KafkaAccessError("refused")

    monkeypatch.setattr(quote_producer, "open_session", open_session)
    settings = load({"PRODUCER_SPOOL_DIR": str(tmp_path / "spool")})
    async with QuoteProducer(settings) as producer:
        with pytest.raises(KafkaAccessError):
            await producer.send_raw(b"AAPL", b"{}")
        assert producer.spool_pending == 0


def test_kafka_settings_are_hashable_for_the_context_cache() -> None:
    assert hash(KafkaSettings()) == hash(KafkaSettings())
