"""One Finnhub trades websocket per API key across producer replicas: a lease in Redis.

Finnhub allows one websocket per API key: opening a second one gets the older one closed
within about a second. Two `finnhub-ws` replicas on one key would knock each other off in a
reconnect storm, so when REDIS_URL is set a replica must hold this lease before it connects:

- key `stockstream:finnhub:ws-lease:<sha256 of the API key, 24 hex digits>` (never the key),
  value `<replica>/<random token>` (replica = host name and pid, so the others can say who
  holds the socket); taken with `SET NX PX <lease>`;
- the holder renews it every lease/3 with a compare-and-renew script (renew if the value is
  still ours, take it again if it is free, else report the holder), and releases it on close
  with a compare-and-delete, so a standby takes over at its next try (every
  `retry_seconds`, 1 s by default) instead of a lease period later;
- the others stand by (logged once per holder, `stockstream_source_ws_lease_held` 0) and try
  again every `retry_seconds`. A holder that dies without releasing (SIGKILL) leaves a lease
  that expires at most one lease period after its last renewal: then a standby takes it;
- a holder that Redis tells another replica holds the lease (it renewed too late, after it
  expired and was taken) is told at once through `wait_lost()` and closes its socket.

Redis unreachable (decided here):

- the holder keeps its socket and keeps trying to renew. Nobody can take a lease from a
  Redis nobody reaches, so keeping it cannot create a second socket; closing it would lose
  every trade for the length of the outage. When Redis answers again the holder renews (or
  takes back the key Redis lost in a restart: for one lease period after an outage the
  standbys leave a free key alone, as if it had survived) or learns it lost the lease and
  closes. If
  only the holder is cut off from Redis and a standby takes over, Finnhub itself drops the
  older socket within a second; after its lease has run out locally the old holder no
  longer reconnects as the holder.
- a replica without the lease stands by for `unreachable_grace_seconds` (3 lease periods by
  default: long enough for a Redis restart, during which a live holder keeps streaming) and
  then connects without the lease, logging it as an error: losing every trade for a long
  outage (no holder may be left: it may have died with Redis) is worse than a storm between
  replicas, which the websocket source detects and backs off from. While connected without
  the lease it keeps trying to take it, and closes its socket if Redis names another holder.

Every Redis command has a deadline (`asyncio.timeout`, not redis-py's socket timeout; see
cache.py for why). The Redis URL may hold a password and is never logged; the API key never
reaches Redis, a log line or a metric.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from stockstream.metrics import SOURCE_WS_LEASE, SOURCE_WS_LEASE_HELD
from stockstream.settings import CacheSettings, FinnhubSettings, Secret, SettingsError

log = logging.getLogger(__name__)

PREFIX = "stockstream:finnhub:ws-lease:"
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
# Returns 1 if the lease is (again) ours, else the value of whoever holds it. Taking a free
# key back is safe: nobody else holds the lease, so nobody else may have a socket open.
_RENEW = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2]) return 1 end
return v
"""
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


def lease_key(api_key: Secret | str, prefix: str = PREFIX) -> str:
    """The Redis key of the lease for `api_key`: a hash, so the key itself never reaches Redis."""
    value = api_key.reveal() if isinstance(api_key, Secret) else api_key
    digest = hashlib.sha256(b"stockstream finnhub websocket lease\0" + value.encode())
    return prefix + digest.hexdigest()[:24]


def _holder_name(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.rpartition("/")[0] or "unknown"


class SocketLease:
    def __init__(
        self,
        client: redis.Redis,
        api_key: Secret | str,
        *,
        lease_seconds: float = 10.0,
        renew_seconds: float | None = None,
        retry_seconds: float | None = None,
        unreachable_grace_seconds: float | None = None,
        op_timeout: float = 1.0,
        replica: str | None = None,
        prefix: str = PREFIX,
    ) -> None:
        """`client` should have no `socket_timeout` (deadlines are ours): use `from_url`."""
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self._client = client
        self.key = lease_key(api_key, prefix)
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.token = f"{self.replica}/{secrets.token_hex(16)}"
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self._lease = lease_seconds
        self._renew_every = renew_seconds if renew_seconds is not None else lease_seconds / 3
        self._retry = retry_seconds if retry_seconds is not None else min(1.0, lease_seconds / 4)
        self._grace = (
            unreachable_grace_seconds
            if unreachable_grace_seconds is not None
            else 3 * lease_seconds
        )
        # Shorter than a renewal period: a renewal that hangs must not outlive the lease.
        self._op_timeout = min(op_timeout, self._renew_every)
        self.held = False  # this replica may have the socket open (with or without the lease)
        self.leased = False  # Redis confirmed the lease is ours
        self._valid_until = 0.0  # monotonic time our lease runs out unless renewed
        self._lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._outage_since: float | None = None  # None: Redis answered the last command
        self._standby_for: str | None = None  # the holder last logged as such
        self._unleased_logged = False
        self._waiting_logged = False
        self._hold_off_until = 0.0  # no SET NX before this (monotonic), see acquire()

    @classmethod
    def from_url(cls, url: str, api_key: Secret | str, **options: Any) -> SocketLease:
        """A lease on a new client for `url`; connecting is lazy (reported when used)."""
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=options.get("op_timeout", 1.0),
                socket_timeout=None,
                retry=Retry(NoBackoff(), 1),
            )
        except ValueError:
            # The message may quote the URL, which may carry a password.
            raise SettingsError(
                "REDIS_URL: not a valid Redis URL (redis://, rediss:// or unix://)"
            ) from None
        return cls(client, api_key, **options)

    def __repr__(self) -> str:
        return f"SocketLease(key={self.key!r}, replica={self.replica!r}, leased={self.leased})"

    async def _call(self, command: Awaitable[Any]) -> Any:
        async with asyncio.timeout(self._op_timeout):
            return await command

    # -- Redis health ------------------------------------------------------------------------

    def _redis_failed(self, exc: BaseException) -> None:
        SOURCE_WS_LEASE.labels("redis_error").inc()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "Redis unreachable for the Finnhub socket lease",
                extra={
                    "replica": self.replica,
                    "holding": self.held,
                    "error": type(exc).__name__,
                    "detail": str(exc)[:200],
                },
            )

    def _redis_ok(self) -> None:
        if self._outage_since is not None:
            log.info(
                "Redis reachable again for the Finnhub socket lease",
                extra={
                    "replica": self.replica,
                    "outage_seconds": round(time.monotonic() - self._outage_since, 3),
                },
            )
            self._outage_since = None
            self._unleased_logged = self._waiting_logged = False
            if not self.held:
                self._hold_off_until = time.monotonic() + self._lease

    # -- acquiring ---------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Return once this replica may open the socket: it holds the lease, or Redis has been
        unreachable for longer than the grace period (see the module docstring)."""
        while True:
            started = time.monotonic()
            try:
                if self.held:
                    # Reconnecting after a drop: the lease must still be ours.
                    answer = await self._call(
                        self._client.eval(_RENEW, 1, self.key, self.token, self._lease_ms)
                    )
                    holder = None if answer == 1 else answer
                elif self._outage_since is not None or time.monotonic() < self._hold_off_until:
                    # Redis is back from an outage, perhaps restarted empty: the replica that
                    # kept the socket through it gets one lease period to take its key back
                    # before the standbys compete for it (as if the key had survived).
                    holder = await self._call(self._client.get(self.key))
                    if holder is None:
                        self._redis_ok()
                        await asyncio.sleep(self._retry)
                        continue
                    if holder in (self.token, self.token.encode()):
                        holder = None  # ours: taken back by our keeper
                else:
                    taken = await self._call(
                        self._client.set(self.key, self.token, nx=True, px=self._lease_ms)
                    )
                    holder = None
                    if not taken:
                        holder = await self._call(self._client.get(self.key))
                        if holder is None:
                            continue  # released between the two commands: try again now
                        if holder in (self.token, self.token.encode()):
                            holder = None  # ours from before (e.g. taken back by the keeper)
            except _REDIS_ERRORS as exc:
                self._redis_failed(exc)
                if self._may_connect_unleased():
                    self._hold(leased=False)
                    return
                await asyncio.sleep(self._retry)
                continue
            self._redis_ok()
            if holder is None:
                self._valid_until = started + self._lease
                self._hold(leased=True)
                return
            if self.held:
                self._lose(holder)
            self._stand_by(holder)
            await asyncio.sleep(self._retry)

    def _may_connect_unleased(self) -> bool:
        now = time.monotonic()
        if self.held and (not self.leased or now < self._valid_until):
            return True  # our lease has not run out (or we already run without one)
        assert self._outage_since is not None
        if now - self._outage_since < self._grace:
            if not self._waiting_logged:
                self._waiting_logged = True
                log.warning(
                    "standing by: Redis unreachable, waiting before connecting without the"
                    " Finnhub socket lease",
                    extra={"replica": self.replica, "grace_seconds": self._grace},
                )
            return False
        return True

    def _hold(self, *, leased: bool) -> None:
        was_leased = self.leased
        self.held, self.leased = True, leased
        self._standby_for = None
        SOURCE_WS_LEASE_HELD.set(1 if leased else 0)
        if self._lost.is_set():
            self._lost = asyncio.Event()
        if leased and not was_leased:
            SOURCE_WS_LEASE.labels("acquired").inc()
            log.info(
                "holding the Finnhub socket lease",
                extra={"replica": self.replica, "lease_key": self.key},
            )
        elif not leased and not self._unleased_logged:
            self._unleased_logged = True
            SOURCE_WS_LEASE.labels("unleased").inc()
            log.error(
                "Redis unreachable: connecting to Finnhub without the socket lease (another"
                " replica may be connected: Finnhub allows one connection per API key)",
                extra={"replica": self.replica, "grace_seconds": self._grace},
            )
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name="finnhub-ws-lease")

    def _stand_by(self, holder: Any) -> None:
        name = _holder_name(holder)
        if self._standby_for != name:
            self._standby_for = name
            SOURCE_WS_LEASE.labels("standby").inc()
            SOURCE_WS_LEASE_HELD.set(0)
            log.info(
                f"standing by: replica {name} holds the Finnhub socket",
                extra={"replica": self.replica, "holder": name, "lease_key": self.key},
            )

    def _lose(self, holder: Any) -> None:
        name = _holder_name(holder)
        self.held = self.leased = False
        SOURCE_WS_LEASE.labels("lost").inc()
        SOURCE_WS_LEASE_HELD.set(0)
        log.error(
            "lost the Finnhub socket lease: closing the websocket",
            extra={"replica": self.replica, "holder": name, "lease_key": self.key},
        )
        self._lost.set()

    # -- holding -----------------------------------------------------------------------------

    async def wait_lost(self) -> None:
        """Return when the current holding ends because another replica holds the lease."""
        await self._lost.wait()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def _keep(self) -> None:
        while self.held:
            await asyncio.sleep(self._renew_every)
            if not self.held:
                return
            started = time.monotonic()
            try:
                answer = await self._call(
                    self._client.eval(_RENEW, 1, self.key, self.token, self._lease_ms)
                )
            except _REDIS_ERRORS as exc:
                # Kept while Redis is unreachable: see the module docstring.
                self._redis_failed(exc)
                continue
            self._redis_ok()
            if answer != 1:
                self._lose(answer)
                return
            self._valid_until = started + self._lease
            if not self.leased:
                self._hold(leased=True)

    async def release(self) -> None:
        """Stop renewing and give the lease up (compare-and-delete) so a standby takes over."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
            # wait(), not await: awaiting would raise the keeper's CancelledError, and
            # suppressing that could swallow a cancellation of our own caller.
            await asyncio.wait([keeper])
        was_held = self.held
        self.held = self.leased = False
        SOURCE_WS_LEASE_HELD.set(0)
        if not was_held:
            return
        try:
            await self._call(self._client.eval(_RELEASE, 1, self.key, self.token))
        except _REDIS_ERRORS as exc:
            self._redis_failed(exc)  # it expires by itself (PX)
            return
        SOURCE_WS_LEASE.labels("released").inc()
        log.info("released the Finnhub socket lease", extra={"replica": self.replica})

    async def close(self) -> None:
        await self.release()
        await self._client.aclose()


def from_settings(finnhub: FinnhubSettings, cache: CacheSettings) -> SocketLease | None:
    """A lease on `REDIS_URL` for the websocket's key, or None when REDIS_URL is not set."""
    url = cache.redis_url.reveal()
    if not url:
        return None
    return SocketLease.from_url(url, finnhub.api_key, lease_seconds=finnhub.ws_lease_seconds)
