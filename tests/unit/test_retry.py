"""The one retry policy: `Backoff.delay`'s growth, jitter and cap, and the `retry` loop (on an
injected sleep, so nothing here really waits)."""

from __future__ import annotations

import asyncio
import random

import pytest

from stockstream.errors import StockstreamError
from stockstream.retry import Backoff, GaveUp, retry


class FakeSleep:
    """Records the pauses `retry` asks for and returns at once."""

    def __init__(self) -> None:
        self.pauses: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


class Flaky:
    """A call that raises `errors` in turn, then returns `result`."""

    def __init__(self, *errors: BaseException, result: str = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    backoff = Backoff(0.5, 8.0)
    for attempt in range(10):
        ceiling = min(8.0, 0.5 * 2**attempt)
        draws = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert len({round(d, 6) for d in draws}) > 100  # jittered, not a constant
    assert backoff.delay(500, rng) <= 8.0  # no overflow for huge attempts


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_refuses_a_non_positive_initial_or_one_above_the_maximum(
    initial: float, maximum: float
) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum)


def test_backoff_accepts_initial_equal_to_maximum() -> None:
    assert Backoff(1.0, 1.0).delay(3, random.Random(1)) <= 1.0


async def test_succeeds_after_failures_with_pauses_that_follow_the_policy() -> None:
    backoff = Backoff(0.5, 8.0)
    sleep = FakeSleep()
    call = Flaky(OSError("down"), OSError("down"), OSError("down"))
    result = await retry(call, backoff, what="test call", sleep=sleep, rng=random.Random(11))
    assert result == "ok"
    assert call.calls == 4
    same_draws = random.Random(11)
    assert sleep.pauses == [backoff.delay(n, same_draws) for n in range(3)]
    for n, pause in enumerate(sleep.pauses):
        ceiling = min(8.0, 0.5 * 2**n)
        assert ceiling / 2 <= pause <= ceiling


async def test_first_success_does_not_sleep() -> None:
    sleep = FakeSleep()
    assert await retry(Flaky(), Backoff(1.0, 2.0), what="test call", sleep=sleep) == "ok"
    assert sleep.pauses == []


async def test_gives_up_after_max_retries_with_the_last_error_as_cause() -> None:
    sleep = FakeSleep()
    errors = [ConnectionError(f"failure {n}") for n in range(1, 5)]
    call = Flaky(*errors)
    with pytest.raises(GaveUp) as caught:
        await retry(call, Backoff(0.1, 1.0), what="upload", max_retries=2, sleep=sleep)
    assert call.calls == 3
    assert caught.value.attempts == 3
    assert caught.value.__cause__ is errors[2]
    assert caught.value.last is errors[2]
    assert "upload" in str(caught.value)
    assert isinstance(caught.value, StockstreamError)
    assert len(sleep.pauses) == 2


async def test_max_retries_zero_means_one_attempt() -> None:
    sleep = FakeSleep()
    call = Flaky(OSError("down"))
    with pytest.raises(GaveUp) as caught:
        await retry(call, Backoff(0.1, 1.0), what="test call", max_retries=0, sleep=sleep)
    assert call.calls == 1
    assert caught.value.attempts == 1
    assert sleep.pauses == []


async def test_fatal_errors_propagate_at_once_without_sleeping() -> None:
    sleep = FakeSleep()
    fatal = PermissionError("bad key")  # a subclass of a listed fatal type counts too
    call = Flaky(fatal)
    with pytest.raises(PermissionError) as caught:
        await retry(call, Backoff(0.1, 1.0), what="test call", fatal=(OSError,), sleep=sleep)
    assert caught.value is fatal
    assert call.calls == 1
    assert sleep.pauses == []


async def test_on_failure_receives_the_error_the_retries_so_far_and_the_delay() -> None:
    sleep = FakeSleep()
    errors = [OSError("one"), TimeoutError("two")]
    seen: list[tuple[BaseException, int, float]] = []

    def on_failure(exc: BaseException, retries: int, delay: float) -> None:
        seen.append((exc, retries, delay))

    result = await retry(
        Flaky(*errors),
        Backoff(0.2, 5.0),
        what="test call",
        on_failure=on_failure,
        sleep=sleep,
        rng=random.Random(5),
    )
    assert result == "ok"
    assert [(exc, retries) for exc, retries, _ in seen] == [(errors[0], 1), (errors[1], 2)]
    assert [delay for _, _, delay in seen] == sleep.pauses


async def test_cancellation_propagates_and_is_not_retried() -> None:
    sleep = FakeSleep()
    call = Flaky(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await retry(call, Backoff(0.1, 1.0), what="test call", sleep=sleep)
    assert call.calls == 1
    assert sleep.pauses == []


async def test_cancellation_while_waiting_propagates() -> None:
    async def cancelled_sleep(seconds: float) -> None:
        raise asyncio.CancelledError

    call = Flaky(OSError("down"))
    with pytest.raises(asyncio.CancelledError):
        await retry(call, Backoff(0.1, 1.0), what="test call", sleep=cancelled_sleep)
    assert call.calls == 1
