"""The shared quote cache against a real redis-server (Debian package `redis-server`), with the
fake Finnhub: replicas sharing the cache call the API once per symbol per TTL, concurrent
misses make one call, a failed call does not block the others, and Redis being down (from the
start, mid-run, or refusing our password) never stops polling."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from stockstream.contracts.quotes import Quote
from stockstream.logs import JsonFormatter
from stockstream.metrics import REGISTRY
from stockstream.settings import CacheSettings, Secret
from stockstream.sources.finnhub.cache import QuoteCache, from_settings
from stockstream.sources.finnhub.rest import FinnhubQuoteSource
from tests.conftest import free_port
from tests.fakes import FakeFinnhub, Fault
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

T0 = 1_767_623_400


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cache_for(url: str, ttl: float) -> QuoteCache:
    cache = from_settings(CacheSettings(redis_url=Secret(url), quote_ttl_seconds=ttl))
    assert cache is not None
    return cache


@contextlib.asynccontextmanager
async def polling(source: FinnhubQuoteSource) -> AsyncIterator[list[Quote]]:
    got: list[Quote] = []

    async def run() -> None:
        async for quote in source.quotes():
            got.append(quote)

    task = asyncio.create_task(run())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_no_redis_url_means_no_cache() -> None:
    assert from_settings(CacheSettings()) is None


async def test_two_replicas_call_the_api_once_per_symbol_per_ttl(
    redis_server: RedisServer,
) -> None:
    ttl = 1.0
    async with FakeFinnhub(auto_advance=True) as fake:
        fake.set_quote("AAPL", 190.0, t=T0)
        fake.set_quote("MSFT", 410.0, t=T0)
        settings = fake.settings(symbols=("AAPL", "MSFT"), poll_interval_seconds=0.1)
        caches = [cache_for(redis_server.url, ttl) for _ in range(2)]
        replicas = [FinnhubQuoteSource(settings, cache=c) for c in caches]
        async with polling(replicas[0]) as got_a, polling(replicas[1]) as got_b:
            await asyncio.sleep(2.6)
        for cache in caches:
            await cache.close()
        # Each replica polled each symbol ~26 times; the API saw one call per symbol per TTL.
        for symbol in ("AAPL", "MSFT"):
            calls = [r.at for r in fake.calls(symbol)]
            assert 2 <= len(calls) <= 3, calls
            assert all(b - a >= ttl - 0.05 for a, b in itertools.pairwise(calls))
            served = {(T0 + i) * 1000 for i in range(1, len(calls) + 1)}  # auto_advance
            seen_a = {q.market_timestamp for q in got_a if q.symbol == symbol}
            seen_b = {q.market_timestamp for q in got_b if q.symbol == symbol}
            assert seen_a | seen_b == served
            # Both replicas read the shared answers, but each quote is sent by one replica
            # only: stock-quotes gets no copy per replica.
            assert seen_a.isdisjoint(seen_b)


async def test_concurrent_misses_make_a_single_call(redis_server: RedisServer) -> None:
    async with FakeFinnhub() as fake:
        fake.set_quote("AAPL", 190.0, t=T0)
        fake.script(Fault.slow(0.3))  # the lock holder's call takes a while
        caches = [cache_for(redis_server.url, 5.0) for _ in range(2)]
        a, b = (FinnhubQuoteSource(fake.settings(), cache=c) for c in caches)
        quote_a, quote_b = await asyncio.gather(a.fetch("AAPL"), b.fetch("AAPL"))
        assert len(fake.requests) == 1
        assert quote_a is not None and quote_a == quote_b  # same fetched_at: one answer
        # Unknown symbols are answered from the cache as well, and still skipped.
        assert await a.fetch("NOPE") is None and await b.fetch("NOPE") is None
        assert len(fake.calls("NOPE")) == 1
        for source in (a, b):
            await source.close()
        for cache in caches:
            await cache.close()


async def test_a_failed_call_does_not_hold_the_others_for_a_ttl(
    redis_server: RedisServer,
) -> None:
    async with FakeFinnhub() as fake:
        fake.set_quote("AAPL", 190.0, t=T0)
        fake.script(*[Fault.error(500)] * 3)
        caches = [cache_for(redis_server.url, 30.0) for _ in range(2)]
        a, b = (FinnhubQuoteSource(fake.settings(max_retries=2), cache=c) for c in caches)
        assert await a.fetch("AAPL") is None  # retries exhausted: nothing cached, lock freed
        started = time.monotonic()
        quote = await b.fetch("AAPL")
        assert quote is not None and time.monotonic() - started < 1.0
        assert [r.status for r in fake.requests] == [500, 500, 500, 200]
        for source in (a, b):
            await source.close()
        for cache in caches:
            await cache.close()


async def test_polls_directly_when_redis_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    errors = metric("stockstream_source_cache_total", outcome="error")
    async with FakeFinnhub(auto_advance=True) as fake:
        fake.set_quote("AAPL", 190.0, t=T0)
        cache = cache_for(f"redis://127.0.0.1:{free_port()}/0", 1.0)  # nothing listens there
        source = FinnhubQuoteSource(fake.settings(poll_interval_seconds=0.05), cache=cache)
        async with polling(source) as got:
            await fake.wait_until(lambda: len(got) >= 5, within=5.0)
        await cache.close()
    assert len(fake.requests) >= 5
    outage = [r for r in caplog.records if "cache unavailable" in r.getMessage()]
    assert len(outage) == 1  # once per outage, not once per poll
    assert metric("stockstream_source_cache_total", outcome="error") >= errors + 5


async def test_redis_dying_mid_run_falls_back_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with FakeFinnhub(auto_advance=True) as fake:
            fake.set_quote("AAPL", 190.0, t=T0)
            cache = QuoteCache.from_url(server.url, ttl_seconds=0.2, retry_seconds=0.3)
            source = FinnhubQuoteSource(fake.settings(poll_interval_seconds=0.05), cache=cache)
            async with polling(source) as got:
                await fake.wait_until(lambda: len(got) >= 2)
                server.stop()
                before = len(got)
                await fake.wait_until(lambda: len(got) >= before + 5)  # still polling
                assert not cache.available
                server.start()  # same port
                hits = metric("stockstream_source_cache_total", outcome="miss")
                await fake.wait_until(
                    lambda: metric("stockstream_source_cache_total", outcome="miss") > hits
                )
                assert cache.available
            await cache.close()
    finally:
        server.stop()


async def test_a_refused_redis_password_falls_back_and_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path, password="right-pass-6c2d")
    server.start()
    try:
        caplog.set_level(logging.DEBUG)
        wrong = "wrong-pass-91fa"
        async with FakeFinnhub() as fake:
            fake.set_quote("AAPL", 190.0, t=T0)
            cache = cache_for(f"redis://:{wrong}@127.0.0.1:{server.port}/0", 1.0)
            source = FinnhubQuoteSource(fake.settings(), cache=cache)
            assert await source.fetch("AAPL") is not None
            await source.close()
            await cache.close()
        assert not cache.available
        logs = "\n".join(JsonFormatter().format(r) for r in caplog.records)
        assert "cache unavailable" in logs and wrong not in logs
    finally:
        server.stop()
