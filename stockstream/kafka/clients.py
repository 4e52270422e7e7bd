"""Every Kafka client of the project, built from one connection config (`KafkaSettings`).

The Faust app, the producer, the archive and warehouse consumers, the restart read-back and
the CLI tools all connect through these functions, so how to reach the cluster (servers,
security protocol, SASL credentials, TLS) is decided in one place. Secrets are revealed only
here, when handed to a client.

Access failures are decided here too. A wrong password, an untrusted certificate or a security
protocol the listener does not speak is not an outage: retrying cannot fix it. aiokafka,
however, reports a failed bootstrap as a bare `KafkaConnectionError` (the cause is only
logged), the same as a broker that is down. So `start` starts a client and, when that fails,
`diagnose` connects once more step by step (TCP, TLS, ApiVersions, SASL, Metadata) to tell the
two apart: an access failure becomes a `KafkaAccessError`, whose message names the setting to
check, and which every entry point treats as fatal; anything else is left as it was (the
quote producer spools, the worker's services restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.protocol.metadata import MetadataRequest

from stockstream.errors import StockstreamError
from stockstream.settings import KafkaSettings, SettingsError

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

#: Seconds each step of `diagnose` may take.
DIAGNOSE_TIMEOUT_SECONDS = 5.0

_SASL_REFUSED = (SaslAuthenticationFailed, AuthenticationFailedError)
_SASL_UNSPOKEN = (IllegalSaslStateError,)
_SASL_MECHANISM = (UnsupportedSaslMechanismError, AuthenticationMethodNotSupported)
_NOT_AUTHORIZED = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)


class KafkaAccessError(StockstreamError):
    """The cluster refused this client: wrong credentials, a TLS failure, a security protocol
    its listener does not speak, or no permission. Retrying cannot help: stop, and fix what
    the message names."""


def bootstrap_servers(kafka: KafkaSettings) -> list[str]:
    return [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()]


@functools.cache
def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of `kafka` (built once per settings value). A file that cannot be used
    raises `SettingsError` naming its variable."""
    cafile = kafka.ssl_cafile
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"KAFKA_SSL_CAFILE: {str(cafile)!r} holds no usable CA certificate (PEM): {exc}"
        ) from None
    context.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_certfile is not None:
        password = kafka.ssl_key_password.reveal() or None
        try:
            context.load_cert_chain(
                str(kafka.ssl_certfile),
                str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
                password=password,
            )
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                "KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE / KAFKA_SSL_KEY_PASSWORD: the client"
                f" certificate and key cannot be loaded ({exc.__class__.__name__}: {exc});"
                " PEM files of a matching pair, and the key's password if it is encrypted"
            ) from None
    return context


def security(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka's security arguments (secrets revealed: hand them to a client only)."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.uses_tls:
        options["ssl_context"] = ssl_context(kafka)
    if kafka.uses_sasl:
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.reveal()
    return options


def connection(kafka: KafkaSettings) -> dict[str, Any]:
    """The keyword arguments every aiokafka client needs to reach the cluster."""
    return {"bootstrap_servers": bootstrap_servers(kafka), **security(kafka)}


def faust_brokers(kafka: KafkaSettings) -> list[str]:
    """The same servers as Faust broker URLs."""
    return [f"kafka://{server}" for server in bootstrap_servers(kafka)]


def faust_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """The same security as Faust's `broker_credentials` (None: plain text)."""
    import faust

    if kafka.uses_sasl:
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.reveal(),
            ssl_context=ssl_context(kafka) if kafka.uses_tls else None,
            mechanism=kafka.sasl_mechanism,
        )
    if kafka.uses_tls:
        return faust.SSLCredentials(ssl_context(kafka))
    return None


def consumer(kafka: KafkaSettings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer (not started). `options` are aiokafka's, e.g. `group_id=None` to read
    without a group."""
    return AIOKafkaConsumer(*topics, **connection(kafka), **options)


def producer(kafka: KafkaSettings, **options: Any) -> AIOKafkaProducer:
    """A producer (not started) with the caller's delivery options."""
    return AIOKafkaProducer(**connection(kafka), **options)


def admin(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection(kafka))


# ---------------------------------------------------------------------- access failures


class _Startable(Protocol):
    async def start(self) -> None: ...


async def start(client: _Startable, kafka: KafkaSettings) -> None:
    """`client.start()`, with an access failure raised as `KafkaAccessError`; any other
    failure (a broker that is down) is raised as it was."""
    try:
        await client.start()
    except Exception as exc:
        found = access_error(exc, kafka)
        if found is None and isinstance(exc, KafkaConnectionError):
            found = await diagnose(kafka)
        if found is not None:
            raise found from exc
        raise


def access_error(
    exc: BaseException, kafka: KafkaSettings, server: str | None = None
) -> KafkaAccessError | None:
    """The `KafkaAccessError` that `exc` means, or None when it is not an access failure
    (no I/O: for what a started client raises; `start` also diagnoses a failed bootstrap)."""
    if isinstance(exc, KafkaAccessError):
        return exc
    at = f"Kafka at {server}" if server else "Kafka"
    protocol = f"KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}"
    detail = _detail(exc)
    if isinstance(exc, _SASL_REFUSED):
        return KafkaAccessError(
            f"{at} refused the credentials of user {kafka.sasl_username!r}"
            f" ({kafka.sasl_mechanism}): {detail}. Check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"
            " (or KAFKA_SASL_PASSWORD_FILE) and KAFKA_SASL_MECHANISM"
        )
    if isinstance(exc, _SASL_MECHANISM):
        return KafkaAccessError(
            f"{at} does not accept SASL mechanism {kafka.sasl_mechanism}: {detail}."
            " Check KAFKA_SASL_MECHANISM"
        )
    if isinstance(exc, _SASL_UNSPOKEN):
        return KafkaAccessError(
            f"{at} does not speak SASL on this listener, but {protocol}. Check"
            " KAFKA_SECURITY_PROTOCOL, and that KAFKA_BOOTSTRAP_SERVERS names the SASL listener"
        )
    if isinstance(exc, _NOT_AUTHORIZED):
        who = f"user {kafka.sasl_username!r}" if kafka.uses_sasl else "this client"
        return KafkaAccessError(
            f"{at} denied {who} an operation: {type(exc).__name__} ({detail}). Check the"
            " ACLs granted to KAFKA_SASL_USERNAME (or to the certificate of KAFKA_SSL_CERTFILE)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        hostname = (
            " and KAFKA_SSL_CHECK_HOSTNAME (the broker's name must be in its certificate)"
            if kafka.ssl_check_hostname
            else ""
        )
        reason = getattr(exc, "verify_message", None) or detail
        return KafkaAccessError(
            f"TLS handshake with {at} failed: the broker's certificate is not trusted"
            f" ({reason}). Check KAFKA_SSL_CAFILE (the CA that signed it){hostname}"
        )
    if isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    ):
        return KafkaAccessError(
            f"TLS handshake with {at} failed ({detail}). Check {protocol}, KAFKA_SSL_CAFILE,"
            " KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"
        )
    return None


def _detail(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    return text or type(exc).__name__


async def diagnose(kafka: KafkaSettings) -> KafkaAccessError | None:
    """Connect to each bootstrap server once, step by step, and return the access failure
    found, if any. None: every server is unreachable (or fine), which is not an access
    failure."""
    for server in bootstrap_servers(kafka):
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            continue
        found = await _diagnose_server(kafka, host.strip("[]"), int(port), server)
        if found is not None:
            return found
    return None


async def _diagnose_server(
    kafka: KafkaSettings, host: str, port: int, server: str
) -> KafkaAccessError | None:
    tls = kafka.uses_tls
    protocol = f"KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}"
    # 1. TCP, TLS and ApiVersions, which a broker answers before any authentication.
    try:
        await _connect(host, port, ssl_context(kafka) if tls else None)
    except KafkaConnectionError:
        # Accepted, then closed before ApiVersions was answered.
        if tls:
            # The TLS handshake had succeeded (a failed one raises ssl/OS errors): the broker
            # dropped us after checking what the handshake told it.
            return KafkaAccessError(
                f"Kafka at {server} closed the connection right after the TLS handshake. The"
                " listener probably requires a client certificate it trusts (check"
                " KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE)"
            )
        if await _speaks_tls(host, port):
            return KafkaAccessError(
                f"Kafka at {server} expects TLS, but {protocol}. Use SSL or SASL_SSL (with"
                " KAFKA_SSL_CAFILE), or the plain-text listener in KAFKA_BOOTSTRAP_SERVERS"
            )
        return None
    except (OSError, TimeoutError) as exc:
        found = access_error(exc, kafka, server)
        if found is not None:
            return found
        if (
            tls
            and isinstance(exc, ConnectionError | ssl.SSLError)
            and await _speaks_plain(host, port)
        ):
            return KafkaAccessError(
                f"Kafka at {server} does not speak TLS (it answers in plain text), but"
                f" {protocol}. Use PLAINTEXT or SASL_PLAINTEXT, or the TLS listener in"
                " KAFKA_BOOTSTRAP_SERVERS"
            )
        return None  # refused, timed out: the broker is down, not refusing us
    except Exception as exc:
        return access_error(exc, kafka, server)
    # 2. The client's own handshake (SASL) and a first real request.
    try:
        await _connect(host, port, None, metadata=True, **security(kafka))
    except KafkaConnectionError:
        if kafka.uses_sasl:
            return KafkaAccessError(
                f"Kafka at {server} closed the connection during SASL authentication. Check"
                " KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM and KAFKA_SASL_USERNAME"
            )
        return KafkaAccessError(
            f"Kafka at {server} requires authentication: it answers, but closes the"
            f" connection at the first request, with {protocol}. Use SASL_PLAINTEXT or"
            " SASL_SSL with KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
        )
    except Exception as exc:
        return access_error(exc, kafka, server)
    return None


async def _connect(
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    *,
    metadata: bool = False,
    **security_options: Any,
) -> None:
    options = security_options or {
        "security_protocol": "SSL" if context else "PLAINTEXT",
        "ssl_context": context,
    }
    timeout_ms = int(DIAGNOSE_TIMEOUT_SECONDS * 1000)
    async with asyncio.timeout(DIAGNOSE_TIMEOUT_SECONDS * 2):
        conn = await create_conn(
            host, port, client_id="stockstream-diagnose", request_timeout_ms=timeout_ms, **options
        )
        try:
            if metadata:
                await conn.send(MetadataRequest([]))
        finally:
            conn.close()


async def _speaks_tls(host: str, port: int) -> bool:
    """Does the port complete a TLS handshake (any certificate)?"""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(DIAGNOSE_TIMEOUT_SECONDS):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def _speaks_plain(host: str, port: int) -> bool:
    """Does the port answer a plain-text ApiVersions request?"""
    try:
        await _connect(host, port, None)
    except Exception:
        return False
    return True
