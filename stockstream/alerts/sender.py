"""Delivering one anomaly to one receiver: the project's retry policy and the receiver's rate
limit around `Receiver.post`.

- Rate limit: at most `ALERT_MAX_PER_MINUTE` requests in any minute per receiver, retries
  included (`sources/ratelimit.py`'s sliding log; a burst of anomalies waits, it is not
  dropped). An HTTP 429 pauses the limiter for the Retry-After, so the retry (and every later
  request to that receiver) waits at least that long.
- Retries: timeouts, connection errors, 5xx and 429 are retried up to `ALERT_MAX_RETRIES` times
  with `retry.py`'s backoff (`ALERT_BACKOFF_INITIAL_SECONDS` .. `ALERT_BACKOFF_MAX_SECONDS`);
  each attempt has `ALERT_TIMEOUT_SECONDS`. A refusal (4xx other than 429) is not retried.
  Either way the caller gets `AlertFailed` and dead-letters the record.
- Waiting is the caller's `sleep`: the consumer service passes one that keeps polling with its
  partitions paused.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from stockstream.alerts.receivers import DeliveryError, DeliveryRefused, Receiver, Throttled
from stockstream.errors import StockstreamError
from stockstream.metrics import ALERT_DELIVERIES
from stockstream.retry import Backoff, GaveUp, Sleep, retry
from stockstream.settings import AlertSettings
from stockstream.sources.ratelimit import RateLimiter

log = logging.getLogger(__name__)


class AlertFailed(StockstreamError):
    """Given up on: refused by the receiver, or still failing after the retries. The message
    names the receiver and the last error (never a secret)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class Abandoned(StockstreamError):
    """The delivery is no longer wanted (its partition was revoked): the next owner does it."""


def _context(anomaly: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "symbol": str(anomaly["symbol"])[:64],
        "kind": anomaly["kind"],
        "window_start_ms": anomaly["window_start_ms"],
    }


class AlertSender:
    """Delivers anomalies to one receiver (module doc); owns its HTTP session."""

    def __init__(
        self,
        receiver: Receiver,
        conf: AlertSettings,
        *,
        sleep: Sleep = asyncio.sleep,
        window_seconds: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.receiver = receiver
        self.conf = conf
        self._sleep = sleep
        self._rng = rng
        maximum = conf.backoff_max_seconds
        self._backoff = Backoff(min(conf.backoff_initial_seconds, maximum), maximum)

        async def limiter_sleep(seconds: float) -> None:
            await self._sleep(seconds)

        # A per-minute budget only: the per-second one is set so it never binds.
        self.limiter = RateLimiter(
            conf.max_per_minute,
            conf.max_per_minute,
            sleep=limiter_sleep,
            minute=window_seconds,
        )
        self._session: aiohttp.ClientSession | None = None
        name = receiver.name
        self._delivered = ALERT_DELIVERIES.labels(name, "delivered")
        self._retried = ALERT_DELIVERIES.labels(name, "retried")
        self._throttled = ALERT_DELIVERIES.labels(name, "throttled")
        self._failed = ALERT_DELIVERIES.labels(name, "failed")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _describe(self, exc: BaseException) -> str:
        # Ours name the receiver already; anything else (a bug) gets its type.
        text = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
        return self.receiver.redact(text)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(
        self, anomaly: Mapping[str, Any], wanted: Callable[[], bool] = lambda: True
    ) -> int:
        """Deliver `anomaly`; returns the number of attempts it took. Raises `AlertFailed`
        when given up on, `Abandoned` as soon as `wanted()` turns false."""
        name = self.receiver.name
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            if not wanted():
                raise Abandoned(f"{name}: no longer wanted")
            await self.limiter.acquire()
            if not wanted():  # the limiter may have waited through a rebalance
                raise Abandoned(f"{name}: no longer wanted")
            attempts += 1
            try:
                await self.receiver.post(self._http(), anomaly, self.conf.timeout_seconds)
            except Throttled as exc:
                if exc.retry_after is not None:
                    self.limiter.penalize(exc.retry_after)
                raise

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            throttled = isinstance(exc, Throttled)
            (self._throttled if throttled else self._retried).inc()
            wait = max(pause, self.limiter.paused_for())
            log.warning(
                f"{name} alert not delivered, retrying",
                extra={
                    "receiver": name,
                    **_context(anomaly),
                    "attempt": retries,
                    "retry_in_s": round(wait, 3),
                    "error": self._describe(exc),
                },
            )

        try:
            await retry(
                attempt,
                self._backoff,
                what=f"{name} alert",
                max_retries=self.conf.max_retries,
                fatal=(DeliveryRefused, Abandoned),
                on_failure=failed,
                sleep=self._sleep,
                rng=self._rng,
            )
        except DeliveryRefused as exc:
            self._failed.inc()
            raise AlertFailed(f"{exc} (refused, not retried)", attempts) from None
        except GaveUp as exc:
            self._failed.inc()
            last = self._describe(exc.last)
            raise AlertFailed(f"{last} (gave up after {attempts} attempts)", attempts) from None
        self._delivered.inc()
        if attempts > 1:
            log.info(
                f"{name} alert delivered after {attempts} attempts",
                extra={"receiver": name, **_context(anomaly), "attempts": attempts},
            )
        return attempts
