"""The Finnhub socket lease against a real redis-server, with the fake Finnhub websocket (which,
like Finnhub, closes the older connection of a key when another one opens, and counts the
connections open at once per key): replicas on one key share one socket, a standby takes over
when the holder stops (at once), is killed (when its lease expires) or is paused (and the
paused holder closes its socket as it resumes), and Redis going down neither drops the
holder's socket nor leaves the replicas fighting once it is back. Short leases keep each test
to a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from stockstream.contracts.quotes import Quote
from stockstream.retry import Backoff
from stockstream.settings import Secret
from stockstream.sources.finnhub.socket_lease import SocketLease
from stockstream.sources.finnhub.websocket import FinnhubTradeSource
from tests.fakes import TOKEN, FakeFinnhub, trade
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

T0 = 1_767_623_400_000
ROOT = Path(__file__).resolve().parents[2]

# A holder in its own process, so that it can be SIGKILLed or SIGSTOPped like a real replica.
_HOLDER = """
import asyncio, os
from stockstream.settings import FinnhubSettings, Secret
from stockstream.sources.finnhub.socket_lease import SocketLease
from stockstream.sources.finnhub.websocket import FinnhubTradeSource

async def main() -> None:
    settings = FinnhubSettings(
        api_key=Secret(os.environ["HOLDER_KEY"]), ws_url=os.environ["HOLDER_WS_URL"],
        symbols=("AAPL",), timeout_seconds=0.5,
        backoff_initial_seconds=0.01, backoff_max_seconds=0.05,
    )
    lease = SocketLease.from_url(
        os.environ["HOLDER_REDIS_URL"], settings.api_key,
        lease_seconds=float(os.environ["HOLDER_LEASE"]), retry_seconds=0.1, replica="process",
    )
    async for _ in FinnhubTradeSource(settings, lease=lease).quotes():
        pass

asyncio.run(main())
"""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_lease(url: str, replica: str, lease: float, **options: float) -> SocketLease:
    return SocketLease.from_url(
        url, Secret(TOKEN), lease_seconds=lease, retry_seconds=0.1, replica=replica, **options
    )


class Replica:
    """A FinnhubTradeSource with its lease, streaming in a task."""

    def __init__(self, fake: FakeFinnhub, lease: SocketLease, **options: Any) -> None:
        self.lease = lease
        self.source = FinnhubTradeSource(fake.settings(), lease=lease, **options)
        self.got: list[Quote] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Replica:
        async def run() -> None:
            async for quote in self.source.quotes():
                self.got.append(quote)

        self.task = asyncio.create_task(run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def close(self) -> None:
        await self.stop()
        await self.lease.close()


@contextlib.asynccontextmanager
async def replicas(*running: Replica) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for replica in running:
            await replica.close()


async def stored_value(url: str, key: str) -> bytes | None:
    client = redis.Redis.from_url(url)
    try:
        value = await client.get(key)
        return value.encode() if isinstance(value, str) else value
    finally:
        await client.aclose()


def standby_lines(caplog: pytest.LogCaptureFixture, holder: str) -> int:
    wanted = f"standing by: replica {holder} holds the Finnhub socket"
    return sum(r.getMessage() == wanted for r in caplog.records)


def opened(fake: FakeFinnhub) -> list[float]:
    return [c.opened_at for c in fake.ws_clients]


@contextlib.contextmanager
def holder_process(
    fake: FakeFinnhub, redis_url: str, lease: float
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "HOLDER_KEY": TOKEN,
        "HOLDER_WS_URL": fake.ws_url,
        "HOLDER_REDIS_URL": redis_url,
        "HOLDER_LEASE": str(lease),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], env=env, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


async def test_two_replicas_on_one_key_share_one_socket(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with FakeFinnhub() as fake:
        a = Replica(fake, make_lease(redis_server.url, "replica-a", 1.0))
        b = Replica(fake, make_lease(redis_server.url, "replica-b", 1.0))
        async with replicas(a, b):
            a.start()
            b.start()
            await fake.wait_subscribed(["AAPL"])
            await asyncio.sleep(2.5)  # several lease periods of renewals and standby retries
            await fake.push_trades([trade("AAPL", 190.0, T0)])
            await fake.wait_until(lambda: len(a.got) + len(b.got) == 1)
            holder, standby = (a, b) if a.lease.leased else (b, a)
            assert holder.lease.leased and not standby.lease.held
            assert await stored_value(redis_server.url, holder.lease.key) == (
                holder.lease.token.encode()
            )
            assert len(holder.got) == 1
        assert [status for _, status in fake.ws_handshakes] == [101]  # one socket, no storm
        assert fake.ws_kicked == 0 and fake.ws_max_open[TOKEN] == 1
    assert standby_lines(caplog, holder.lease.replica) == 1  # logged once, not per retry
    assert TOKEN not in holder.lease.key


async def test_the_standby_takes_over_at_once_when_the_holder_stops(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    lease = 3.0  # takeover must come from the release, not from the lease running out
    async with FakeFinnhub() as fake:
        holder = Replica(fake, make_lease(redis_server.url, "holder", lease)).start()
        await fake.wait_subscribed(["AAPL"])
        standby = Replica(fake, make_lease(redis_server.url, "standby", lease)).start()
        async with replicas(holder, standby):
            await fake.wait_until(lambda: standby_lines(caplog, "holder") == 1)
            stopped = time.monotonic()
            await holder.stop()  # releases the lease (compare-and-delete)
            await fake.wait_subscribed(["AAPL"], connections=2, within=lease)
            first, second = fake.ws_clients
            assert second.opened_at - stopped < 1.0
            assert first.closed_at is not None and first.closed_at <= second.opened_at
            assert standby.lease.leased
            await fake.push_trades([trade("AAPL", 191.0, T0)])
            await fake.wait_until(lambda: len(standby.got) == 1)
        assert fake.ws_kicked == 0 and fake.ws_max_open[TOKEN] == 1


async def test_the_standby_takes_over_when_a_killed_holders_lease_expires(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL: no release, the socket dies with the process, the lease stays until it expires
    (at most one lease period after the last renewal, at least two thirds of one)."""
    caplog.set_level(logging.INFO)
    lease = 1.5
    async with FakeFinnhub() as fake:
        with holder_process(fake, redis_server.url, lease) as proc:
            await fake.wait_subscribed(["AAPL"], within=15.0)
            standby = Replica(fake, make_lease(redis_server.url, "standby", lease)).start()
            async with replicas(standby):
                await fake.wait_until(lambda: standby_lines(caplog, "process") == 1)
                await asyncio.sleep(0.3)
                proc.kill()
                killed = time.monotonic()
                await fake.wait_subscribed(["AAPL"], connections=2, within=lease + 2.0)
                first, second = fake.ws_clients
                takeover = second.opened_at - killed
                assert lease * 0.5 <= takeover <= lease + 0.8, takeover
                assert first.closed_at is not None and first.closed_at <= second.opened_at
                assert standby.lease.leased
        assert fake.ws_kicked == 0 and fake.ws_max_open[TOKEN] == 1


async def test_a_paused_holder_closes_its_socket_as_soon_as_it_resumes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP past its lease: a standby takes over; on SIGCONT the old holder's renewal
    finds another replica's token and it closes its socket at once (the fake does not drop
    it here, so that only the holder's own reaction ends the overlap)."""
    caplog.set_level(logging.INFO)
    lease = 1.0
    async with FakeFinnhub(one_ws_per_token=False) as fake:
        with holder_process(fake, redis_server.url, lease) as proc:
            await fake.wait_subscribed(["AAPL"], within=15.0)
            standby = Replica(fake, make_lease(redis_server.url, "standby", lease)).start()
            async with replicas(standby):
                await fake.wait_until(lambda: standby_lines(caplog, "process") == 1)
                proc.send_signal(signal.SIGSTOP)
                await fake.wait_subscribed(["AAPL"], connections=2, within=lease + 2.0)
                paused_holder = fake.ws_clients[0]
                assert not paused_holder.closed  # both open while the holder is paused
                proc.send_signal(signal.SIGCONT)
                resumed = time.monotonic()
                await fake.wait_until(lambda: paused_holder.closed, within=2.0)
                assert paused_holder.closed_at is not None
                assert paused_holder.closed_at - resumed < 0.5
                await asyncio.sleep(lease)  # the old holder now stands by: no reconnection
                assert len(fake.ws_clients) == 2 and len(fake.open_clients) == 1
                assert standby.lease.leased
                assert proc.poll() is None


async def test_the_holder_keeps_its_socket_while_redis_is_down(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    lease = 0.6
    async with FakeFinnhub() as fake:
        holder = Replica(fake, make_lease(redis_server.url, "holder", lease)).start()
        await fake.wait_subscribed(["AAPL"])
        standby = Replica(
            fake, make_lease(redis_server.url, "standby", lease, unreachable_grace_seconds=10)
        ).start()
        async with replicas(holder, standby):
            await fake.wait_until(lambda: standby_lines(caplog, "holder") == 1)
            redis_server.stop()
            await asyncio.sleep(4 * lease)  # the lease would have expired several times
            assert len(fake.ws_clients) == 1 and fake.open_clients == fake.ws_clients
            await fake.push_trades([trade("AAPL", 190.0, T0)])
            await fake.wait_until(lambda: len(holder.got) == 1)
            redis_server.start()  # same port, empty: the holder takes its key back
            token = holder.lease.token.encode()
            deadline = time.monotonic() + 3.0
            while await stored_value(redis_server.url, holder.lease.key) != token:
                assert time.monotonic() < deadline, "the holder did not take its lease back"
                await asyncio.sleep(0.05)
            await asyncio.sleep(3 * lease)
            assert len(fake.ws_clients) == 1 and holder.lease.leased
            assert not standby.lease.held
        assert fake.ws_kicked == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("Redis unreachable for the Finnhub socket lease") == 2  # one each
    assert not any("connecting to Finnhub without the socket lease" in m for m in messages)


async def test_replicas_converge_on_one_socket_when_redis_returns_after_a_long_outage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond the grace period the standby connects without the lease (and the two fight,
    backing off); once Redis answers again one of them takes the lease and the other closes
    its socket and stands by."""
    caplog.set_level(logging.INFO)
    lease = 0.6
    storm = {"short_connection_seconds": 1.0, "storm_backoff": Backoff(0.2, 0.4)}
    async with FakeFinnhub() as fake:
        a = Replica(
            fake, make_lease(redis_server.url, "a", lease, unreachable_grace_seconds=0.8), **storm
        ).start()
        await fake.wait_subscribed(["AAPL"])
        b = Replica(
            fake, make_lease(redis_server.url, "b", lease, unreachable_grace_seconds=0.8), **storm
        ).start()
        async with replicas(a, b):
            await fake.wait_until(lambda: standby_lines(caplog, "a") == 1)
            redis_server.stop()
            await fake.wait_until(lambda: len(fake.ws_clients) >= 3, within=5.0)
            assert a.lease.held and b.lease.held and not (a.lease.leased or b.lease.leased)
            redis_server.start()
            await fake.wait_until(lambda: a.lease.leased or b.lease.leased, within=3.0)
            holder, other = (a, b) if a.lease.leased else (b, a)
            await fake.wait_until(lambda: not other.lease.held, within=3.0)
            await fake.wait_until(lambda: len(fake.open_clients) == 1, within=3.0)
            settled = len(fake.ws_clients)
            await asyncio.sleep(1.5)
            assert len(fake.ws_clients) == settled and len(fake.open_clients) == 1
            assert holder.lease.leased and not other.lease.held
            assert await stored_value(redis_server.url, holder.lease.key) == (
                holder.lease.token.encode()
            )
            await fake.push_trades([trade("AAPL", 190.0, T0)])
            await fake.wait_until(lambda: len(holder.got) == 1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("connecting to Finnhub without the socket lease" in m for m in messages)
    assert any(m == "lost the Finnhub socket lease: closing the websocket" for m in messages)
