"""The compose stack's Redis ACL (written by deploy/compose/make-secrets.sh) on a real redis-server
(Debian package `redis-server`) with the producer's real Redis code: the `stockstream` user of
REDIS_URL can do what the Finnhub quote cache and the websocket lease do, and nothing beyond its
keys and commands; the passwordless `default` user can only PING (the health check)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from stockstream.sources.finnhub.cache import QuoteCache
from stockstream.sources.finnhub.socket_lease import SocketLease
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server started as the compose file starts it; yields the producer's URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server not found: install the Debian package redis-server")
    secrets = tmp_path / "secrets"
    subprocess.run(
        ["sh", str(ROOT / "deploy/compose/make-secrets.sh"), str(secrets)],
        check=True,
        capture_output=True,
    )
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    args += ["--aclfile", str(secrets / "redis_acl"), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [exe, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cli = ["redis-cli", "-p", str(port), "ping"]
        for _ in range(200):
            if subprocess.run(cli, capture_output=True, text=True).stdout.strip() == "PONG":
                break
            assert proc.poll() is None, "redis-server refused the ACL file"
            subprocess.run(["sleep", "0.05"], check=True)
        url = (secrets / "redis_url").read_text().replace("@redis:6379/", f"@127.0.0.1:{port}/")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_the_producer_user_can_cache_and_lease_and_nothing_more(acl_redis: str) -> None:
    cache = QuoteCache.from_url(acl_redis, ttl_seconds=10)
    fetched = []

    async def fetch() -> bytes:
        fetched.append(1)
        return b'{"c": 1.0}'

    try:
        assert await cache.get_or_fetch("AAPL", fetch) == b'{"c": 1.0}'
        assert await cache.get_or_fetch("AAPL", fetch) == b'{"c": 1.0}'
        assert len(fetched) == 1, "the second read must come from Redis"
        assert await cache.claim("AAPL", 1_767_623_400) is True
        assert await cache.claim("AAPL", 1_767_623_400) is False
        assert cache.available
    finally:
        await cache.close()

    lease = SocketLease.from_url(acl_redis, "d0fake-key")
    try:
        await asyncio.wait_for(lease.acquire(), timeout=5)
        assert lease.held
        await lease.release()
    finally:
        await lease.close()

    client = aioredis.from_url(acl_redis)
    try:
        with pytest.raises(NoPermissionError):
            await client.set("other:key", b"1")
        with pytest.raises(NoPermissionError):
            await client.flushall()
        with pytest.raises(NoPermissionError):
            await client.config_get("*")
    finally:
        await client.aclose()


async def test_the_default_user_may_only_ping(acl_redis: str) -> None:
    host_port = acl_redis.rpartition("@")[2].split("/")[0]
    client = aioredis.from_url(f"redis://{host_port}/0")
    try:
        assert await client.ping()
        with pytest.raises((NoPermissionError, ResponseError)):
            await client.get("stockstream:finnhub:quote:AAPL")
    finally:
        await client.aclose()
