"""The worker's delivery loop step (kafka/faust_transport.py): inline while a delivery does not
block, else continued exactly as a Task would, under Faust's `wait_first`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stockstream.kafka.faust_transport import (
    FETCH_MAX_WAIT_MS,
    LeanConsumer,
    Transport,
    deliver,
    fetch_max_wait_ms,
)
from stockstream.settings import SettingsError, load_settings


class WaitFirst:
    """Faust's `Service.wait_first`, reduced to what `deliver` relies on: the delivery runs in
    its own task and is cancelled when the flow is suspended first."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, delivery: Any, suspended: Any) -> None:
        self.calls += 1
        task = asyncio.ensure_future(delivery)
        stop = asyncio.ensure_future(suspended)
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (task, stop):
            if fut not in done:
                fut.cancel()
        if task in done:
            task.result()


async def test_a_delivery_that_does_not_block_runs_inline() -> None:
    delivered: list[int] = []

    async def callback(message: int) -> None:
        delivered.append(message)

    wait_first = WaitFirst()
    tasks_before = len(asyncio.all_tasks())
    await deliver(callback, 7, wait_first, asyncio.Event())
    assert delivered == [7]
    assert wait_first.calls == 0
    assert len(asyncio.all_tasks()) == tasks_before


async def test_a_blocked_delivery_goes_on_under_wait_first_with_its_awaited_results() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def callback(message: int) -> None:
        seen.append(await gate)  # e.g. a full stream buffer
        await asyncio.sleep(0)  # a bare yield on the way
        seen.append(await asyncio.sleep(0.01, result=f"after {message}"))

    wait_first = WaitFirst()
    asyncio.get_running_loop().call_later(0.01, gate.set_result, "room")
    await deliver(callback, 3, wait_first, asyncio.Event())
    assert seen == ["room", "after 3"]
    assert wait_first.calls == 1


async def test_an_exception_after_blocking_reaches_the_caller() -> None:
    async def callback(message: int) -> None:
        await asyncio.sleep(0.01)
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        await deliver(callback, 1, WaitFirst(), asyncio.Event())


async def test_suspending_the_flow_cancels_a_blocked_delivery_inside_the_callback() -> None:
    cancelled = asyncio.Event()

    async def callback(message: int) -> None:
        try:
            await asyncio.sleep(30)  # blocked until the flow is suspended
        except asyncio.CancelledError:
            cancelled.set()
            raise

    suspended = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, suspended.set)
    await asyncio.wait_for(deliver(callback, 1, WaitFirst(), suspended), timeout=5)
    assert cancelled.is_set()


def test_the_transport_uses_the_lean_consumer_and_the_idempotent_producer() -> None:
    assert Transport.Consumer is LeanConsumer
    assert Transport.Producer._settings_extra is not Transport.__mro__[1].Producer._settings_extra


def test_the_fetch_wait_comes_from_the_settings_and_has_a_default_for_bare_apps() -> None:
    class App:
        settings = load_settings({"STOCKSTREAM_FETCH_MAX_WAIT_SECONDS": "0.25"}, dotenv_path=None)

    assert fetch_max_wait_ms(App()) == 250
    assert fetch_max_wait_ms(object()) == FETCH_MAX_WAIT_MS == 100
    for bad in ("0", "11", "x"):
        with pytest.raises(SettingsError, match="STOCKSTREAM_FETCH_MAX_WAIT_SECONDS"):
            load_settings({"STOCKSTREAM_FETCH_MAX_WAIT_SECONDS": bad}, dotenv_path=None)
