"""RateLimiter on virtual time (exact budgets, real 60-second windows, instantly) and on the real
clock (penalties reach callers that are already waiting). The backoff is tested in test_retry."""

from __future__ import annotations

import asyncio
import time

import pytest

from stockstream.sources.ratelimit import RateLimiter
from tests.fakes import max_in_window


class VirtualClock:
    """`clock()` and `sleep()` for the limiter: sleeping advances time instantly."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def limiter(per_minute: int, per_second: int, clock: VirtualClock) -> RateLimiter:
    return RateLimiter(per_minute, per_second, clock=clock, sleep=clock.sleep, margin=0.0)


async def acquire_times(lim: RateLimiter, clock: VirtualClock, count: int) -> list[float]:
    times = []
    for _ in range(count):
        await lim.acquire()
        times.append(clock.now)
    return times


async def test_per_second_budget_is_never_exceeded_in_any_window() -> None:
    clock = VirtualClock()
    times = await acquire_times(limiter(10_000, 5, clock), clock, 23)
    assert max_in_window(times, 1.0) == 5
    # ...and it is not slower than needed: 5 per second, so call 23 goes at t0 + 4 s.
    assert times[-1] - times[0] == pytest.approx(4.0)


async def test_per_minute_budget_holds_over_real_minutes() -> None:
    clock = VirtualClock()
    times = await acquire_times(limiter(20, 5, clock), clock, 45)
    assert max_in_window(times, 1.0) <= 5
    assert max_in_window(times, 60.0) == 20
    # The first 20 go at 5/s (4 s), the 21st waits until the first leaves the minute.
    assert times[19] - times[0] == pytest.approx(3.0)
    assert times[20] - times[0] == pytest.approx(60.0)


async def test_free_plan_budget() -> None:
    clock = VirtualClock()
    times = await acquire_times(limiter(60, 30, clock), clock, 200)
    assert max_in_window(times, 1.0) <= 30
    assert max_in_window(times, 60.0) <= 60


async def test_penalize_pauses_the_next_caller_and_never_shortens_a_pause() -> None:
    clock = VirtualClock()
    lim = limiter(10_000, 1_000, clock)
    await lim.acquire()
    lim.penalize(3.0)
    lim.penalize(1.0)  # a shorter penalty later does not shorten the first
    assert lim.paused_for() == pytest.approx(3.0)
    start = clock.now
    await lim.acquire()
    assert clock.now - start == pytest.approx(3.0)
    assert lim.paused_for() == 0.0


async def test_margin_widens_windows() -> None:
    clock = VirtualClock()
    lim = RateLimiter(10_000, 2, clock=clock, sleep=clock.sleep, margin=0.05)
    times = await acquire_times(lim, clock, 3)
    assert times[2] - times[0] == pytest.approx(1.05)


async def test_penalty_reaches_callers_already_waiting() -> None:
    """A 429 seen by one request slows everyone: callers queued before it wait too."""
    lim = RateLimiter(10_000, 2, second=0.3, margin=0.0)  # "per second" = per 0.3 s, for speed
    await lim.acquire()
    await lim.acquire()  # budget of this window used: the next callers wait ~0.3 s
    start = time.monotonic()
    waiters = [asyncio.create_task(lim.acquire()) for _ in range(2)]
    await asyncio.sleep(0.05)
    lim.penalize(0.6)  # arrives while they wait, and is longer than their wait
    await asyncio.gather(*waiters)
    assert time.monotonic() - start >= 0.6 + 0.05 - 0.01


async def test_concurrent_callers_are_served_in_order_within_budget() -> None:
    clock = VirtualClock()
    lim = limiter(10_000, 3, clock)
    order: list[int] = []
    times: list[float] = []

    async def call(i: int) -> None:
        await lim.acquire()
        order.append(i)
        times.append(clock.now)

    await asyncio.gather(*(call(i) for i in range(10)))
    assert order == list(range(10))
    assert max_in_window(times, 1.0) == 3


def test_rejects_empty_budgets() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0, 1)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)
