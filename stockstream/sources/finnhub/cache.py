"""Optional shared cache of API answers in Redis, so several producer replicas share one budget.

For a symbol S, `get_or_fetch(S, call_api)`:

1. reads `stockstream:finnhub:quote:S`; a hit is returned without calling the API;
2. on a miss takes a short lock (`SET ...:lock:S <token> NX PX lock`) so that one replica
   calls the API for S while the others wait (polling the cache every `poll_seconds`, at most
   `wait_seconds`) and return the answer it stores for `ttl_seconds`;
3. the lock holder looks at the cache once more (the previous holder may have just stored an
   answer), calls the API, stores the answer, and releases the lock (compare-and-delete, so an
   expired lock now held by another replica is left alone). A failed call stores nothing, so
   the next replica to try takes the lock and calls the API itself.

So the API is called at most once per symbol per TTL across all replicas (unless a call takes
longer than the lock, which then expires so a crashed replica cannot block the others).

Redis being unavailable never stops polling: every Redis command has a deadline
(`op_timeout`), the error is logged once per outage, counted, and every call goes straight to
the API (Redis is tried again after `retry_seconds`). The Redis URL may contain a password, so
it is a `Secret` and never logged.

Deadlines are `asyncio.timeout` blocks around each command rather than redis-py's
`socket_timeout`: on Python 3.11 redis-py enforces that one with `asyncio.wait_for`, which can
swallow a cancellation that arrives as the write completes, and then a cancelled source keeps
polling forever (seen in the tests while Redis was restarting). `asyncio.timeout` does not.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from stockstream.metrics import SOURCE_CACHE
from stockstream.settings import CacheSettings, SettingsError

log = logging.getLogger(__name__)

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
# Delete the lock only if it is still ours.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)

Fetch = Callable[[], Awaitable[bytes | None]]


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class QuoteCache:
    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: float,
        lock_seconds: float | None = None,
        wait_seconds: float | None = None,
        poll_seconds: float = 0.05,
        retry_seconds: float = 5.0,
        op_timeout: float = 1.0,
        prefix: str = "stockstream:finnhub:quote:",
    ) -> None:
        """`client` should have no `socket_timeout` (see the module docstring): `from_url`."""
        self._client = client
        self._op_timeout = op_timeout
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._lock_ms = max(1, int((lock_seconds or ttl_seconds) * 1000))
        self._wait = wait_seconds if wait_seconds is not None else self._lock_ms / 1000
        self._poll = poll_seconds
        self._retry = retry_seconds
        self._prefix = prefix
        self._down_until: float | None = None  # None: Redis considered healthy

    @classmethod
    def from_url(cls, url: str, *, ttl_seconds: float, **options: Any) -> QuoteCache:
        """A cache on a new client for `url`; `options` go to `QuoteCache(...)`.

        Connecting is lazy: an unreachable Redis does not fail here, it is reported when used.
        """
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=options.get("op_timeout", 1.0),
                socket_timeout=None,  # deadlines are ours, see the module docstring
                # One immediate retry (a pooled connection may be stale after a Redis
                # restart), no backoff: when Redis is down we fall back to the API at once.
                retry=Retry(NoBackoff(), 1),
            )
        except ValueError:
            # The message of a bad URL may quote the URL, which may carry a password.
            raise SettingsError(
                "REDIS_URL: not a valid Redis URL (redis://, rediss:// or unix://)"
            ) from None
        return cls(client, ttl_seconds=ttl_seconds, **options)

    async def _call(self, command: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self._op_timeout):
            return await command

    def _key(self, symbol: str) -> str:
        return f"{self._prefix}{symbol}"

    def _lock_key(self, symbol: str) -> str:
        return f"{self._prefix}lock:{symbol}"

    @property
    def available(self) -> bool:
        return self._down_until is None or time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException, symbol: str) -> None:
        SOURCE_CACHE.labels("error").inc()
        if self._down_until is None:
            log.warning(
                "quote cache unavailable, calling the API directly",
                extra={"symbol": symbol, "error": type(exc).__name__, "detail": str(exc)[:200]},
            )
        self._down_until = time.monotonic() + self._retry

    def _ok(self) -> None:
        if self._down_until is not None:
            log.info("quote cache reachable again")
            self._down_until = None

    async def get_or_fetch(self, symbol: str, fetch: Fetch) -> bytes | None:
        """The cached answer for `symbol`, or `fetch()`'s (stored for the others); None = none."""
        if not self.available:
            SOURCE_CACHE.labels("error").inc()
            return await fetch()
        key, lock_key = self._key(symbol), self._lock_key(symbol)
        try:
            cached = await self._call(self._client.get(key))
        except _REDIS_ERRORS as exc:
            self._failed(exc, symbol)
            return await fetch()
        self._ok()
        if cached is not None:
            SOURCE_CACHE.labels("hit").inc()
            return _as_bytes(cached)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + self._wait
        while True:
            try:
                locked = await self._call(
                    self._client.set(lock_key, token, nx=True, px=self._lock_ms)
                )
            except _REDIS_ERRORS as exc:
                self._failed(exc, symbol)
                return await fetch()
            if locked:
                return await self._fetch_and_store(symbol, token, fetch)
            # Another replica is calling the API for this symbol: wait for its answer. If it
            # fails it releases the lock, and the next SET NX above makes us the caller.
            await asyncio.sleep(self._poll)
            try:
                cached = await self._call(self._client.get(key))
            except _REDIS_ERRORS as exc:
                self._failed(exc, symbol)
                return await fetch()
            if cached is not None:
                SOURCE_CACHE.labels("waited").inc()
                return _as_bytes(cached)
            if time.monotonic() >= deadline:
                SOURCE_CACHE.labels("wait_timeout").inc()
                log.warning(
                    "no cached quote after waiting for the replica holding the lock, skipping",
                    extra={"symbol": symbol, "waited_seconds": self._wait},
                )
                return None

    async def _fetch_and_store(self, symbol: str, token: str, fetch: Fetch) -> bytes | None:
        key, lock_key = self._key(symbol), self._lock_key(symbol)
        try:
            try:
                cached = await self._call(self._client.get(key))
            except _REDIS_ERRORS as exc:
                self._failed(exc, symbol)
                cached = None
            if cached is not None:
                SOURCE_CACHE.labels("hit").inc()
                return _as_bytes(cached)
            SOURCE_CACHE.labels("miss").inc()
            value = await fetch()
            if value is not None and self.available:
                try:
                    await self._call(self._client.set(key, value, px=self._ttl_ms))
                except _REDIS_ERRORS as exc:
                    self._failed(exc, symbol)
            return value
        finally:
            if self.available:
                try:
                    await self._call(self._client.eval(_RELEASE, 1, lock_key, token))
                except _REDIS_ERRORS as exc:
                    # The lock expires by itself (PX).
                    self._failed(exc, symbol)

    async def claim(self, symbol: str, market_timestamp: int) -> bool:
        """True for exactly one replica per (symbol, quote time): the one that sends it.

        Replicas sharing the cache see the same answers; without this each of them would put
        the same quote into stock-quotes and the windows would count it once per replica.
        When Redis is unreachable every replica claims (duplicates beat losing quotes)."""
        if not self.available:
            return True
        key = f"{self._prefix}sent:{symbol}:{market_timestamp}"
        try:
            # Kept well past the TTL: a late replica must still find the claim.
            claimed = await self._call(
                self._client.set(key, b"1", nx=True, px=max(self._ttl_ms * 10, 60_000))
            )
        except _REDIS_ERRORS as exc:
            self._failed(exc, symbol)
            return True
        self._ok()
        if not claimed:
            SOURCE_CACHE.labels("claimed_elsewhere").inc()
        return bool(claimed)

    async def close(self) -> None:
        await self._client.aclose()


def from_settings(settings: CacheSettings) -> QuoteCache | None:
    """A cache on `REDIS_URL`, or None when it is not set (then sources call the API directly).

    Connecting is lazy: an unreachable Redis does not fail start-up, it is reported when used.
    """
    url = settings.redis_url.reveal()
    if not url:
        return None
    return QuoteCache.from_url(url, ttl_seconds=settings.quote_ttl_seconds)
