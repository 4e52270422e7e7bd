"""The one retry policy: exponential backoff with "equal jitter", and a loop that applies it.

Every stage that talks to something that can be away (the broker, object storage, the
warehouse, an HTTP API) waits the same way: the ceiling doubles per retry from `initial` up to
`maximum`, and the delay is drawn from [ceiling/2, ceiling]. Half fixed, half random: clients
that failed together spread out, yet a retry never comes back almost at once (full jitter can
draw ~0). What differs between stages -- how to wait (a consumer must keep polling while it
waits), what to count and log, when to give up -- is passed in.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from stockstream.errors import StockstreamError

T = TypeVar("T")

#: Called after a failed attempt: (the error, retries so far including this one, delay).
OnFailure = Callable[[BaseException, int, float], None]
Sleep = Callable[[float], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_seconds: float
    max_seconds: float

    def __post_init__(self) -> None:
        if not 0 < self.initial_seconds <= self.max_seconds:
            raise ValueError(
                f"backoff needs 0 < initial <= max, got {self.initial_seconds}, {self.max_seconds}"
            )

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The pause before retry number `retry` (0-based)."""
        ceiling = min(self.max_seconds, self.initial_seconds * (2.0 ** min(max(retry, 0), 62)))
        draw = (rng or random).random()
        return ceiling / 2 + draw * ceiling / 2


class GaveUp(StockstreamError):
    """`max_retries` retries failed; the last error is the `__cause__`."""

    def __init__(self, what: str, attempts: int, last: BaseException) -> None:
        super().__init__(f"{what} failed after {attempts} attempts: {last!r}")
        self.attempts = attempts
        self.last = last


async def retry(
    call: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    what: str,
    max_retries: int | None = None,
    fatal: tuple[type[BaseException], ...] = (),
    on_failure: OnFailure | None = None,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
) -> T:
    """`await call()` until it succeeds.

    `max_retries=None` retries forever; otherwise `GaveUp` after that many retries. Errors of
    the `fatal` types (and cancellation) propagate at once. `sleep` is how to wait: a Kafka
    consumer passes one that keeps polling with its partitions paused.
    """
    retries = 0
    while True:
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if fatal and isinstance(exc, fatal):
                raise
            if max_retries is not None and retries >= max_retries:
                raise GaveUp(what, retries + 1, exc) from exc
            pause = backoff.delay(retries, rng)
            retries += 1
            if on_failure is not None:
                on_failure(exc, retries, pause)
            await sleep(pause)
