"""Client-side rate limiting for the HTTP sources (the retry backoff is `stockstream.retry`).

`RateLimiter` enforces two sliding-window budgets at once, e.g. Finnhub's free plan: at most
`per_minute` calls in *any* 60-second window and at most `per_second` calls in any 1-second
window. A sliding log (the timestamps of the last calls) is stricter than a token bucket: a
bucket that starts full lets through `capacity + refill` calls in its first window, which is
exactly what gets an API key throttled.

`penalize(seconds)` pauses every caller of the limiter, not only the request that was
answered HTTP 429: the budget is shared, so one 429 means all of them would get one.

The clock and the sleep function are injectable so the tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """`await acquire()` before every call; returns when the call fits in both budgets.

    Waiters are served in arrival order (an asyncio.Lock is FIFO). Calls are stamped when
    they leave, but the server counts them when they arrive: if the first call of a window is
    slower on the way (a new TCP/TLS connection, a retransmit) than a later one, the server
    sees them closer together than we sent them. `margin` widens both windows by that much
    slack; it only costs throughput when the per-second budget is the binding one.
    """

    def __init__(
        self,
        per_minute: int,
        per_second: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        minute: float = 60.0,
        second: float = 1.0,
        margin: float = 0.25,
    ) -> None:
        if per_minute <= 0 or per_second <= 0:
            raise ValueError("rate budgets must be > 0")
        self._budgets: tuple[tuple[int, float, deque[float]], ...] = (
            (per_minute, minute + margin, deque()),
            (per_second, second + margin, deque()),
        )
        self._clock = clock
        self._sleep = sleep
        self._blocked_until = float("-inf")
        self._lock = asyncio.Lock()
        self.acquired = 0
        self.waited_seconds = 0.0

    def _wait_needed(self, now: float) -> float:
        wait = self._blocked_until - now
        for limit, window, stamps in self._budgets:
            while stamps and stamps[0] <= now - window:
                stamps.popleft()
            if len(stamps) >= limit:
                # The oldest call in the window must leave it before another one fits.
                wait = max(wait, stamps[0] + window - now)
        return wait

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait_needed(now)
                if wait <= 0:
                    for _, _, stamps in self._budgets:
                        stamps.append(now)
                    self.acquired += 1
                    return
                self.waited_seconds += wait
                # Re-check after sleeping: a penalty may have arrived in the meantime.
                await self._sleep(wait)

    def penalize(self, seconds: float) -> None:
        """Let no call through for `seconds` from now (HTTP 429); never shortens a pause."""
        if seconds > 0:
            self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def paused_for(self) -> float:
        """Seconds left of the current penalty (0 when none)."""
        return max(0.0, self._blocked_until - self._clock())
