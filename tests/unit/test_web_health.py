"""`/health/` and `/ready/` bodies with each dependency up and down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from stockstream.metrics import ARCHIVE_BLOCKED, REGISTRY
from stockstream.web import health


def reachable(answer: bool = True) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return answer

    return probe


def broker(
    partitions: list[int] | None = None,
    rebalancing: bool = False,
    producer: Callable[[], Awaitable[bool]] | None = None,
    **kwargs: float,
) -> health.BrokerProbe:
    return health.BrokerProbe(
        lambda: [0, 1] if partitions is None else partitions,
        lambda: rebalancing,
        producer or reachable(),
        **kwargs,
    )


async def test_everything_up_is_ready() -> None:
    found = await health.check([broker(), lambda: health.warehouse(False)])
    status, body = health.ready_body(found)
    assert status == 200 and body["ready"] and body["failing"] == []
    assert body["dependencies"]["broker"]["state"] == "up"
    assert body["partitions"] == [0, 1] and body["rebalancing"] is False


@pytest.mark.parametrize(
    ("probe", "reason"),
    [
        (broker(partitions=[]), "no partition"),
        (broker(rebalancing=True), "rebalancing"),
        (broker(producer=reachable(False)), "no broker answered"),
    ],
)
async def test_a_broker_problem_makes_ready_fail_naming_it(
    probe: health.BrokerProbe, reason: str
) -> None:
    found = await health.check([probe])
    status, body = health.ready_body(found)
    assert status == 503 and body["failing"] == ["broker"]
    assert reason in body["dependencies"]["broker"]["detail"]
    # Liveness still answers, with the same states.
    live = health.health_body("app", found)
    assert live["status"] == "ok" and live["dependencies"]["broker"]["state"] == "down"


async def test_a_producer_that_hangs_or_raises_is_down() -> None:
    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    async def raises() -> bool:
        raise RuntimeError("producer not started")

    for probe, reason in ((hangs, "no answer within"), (raises, "producer not started")):
        (found,) = await health.check([broker(producer=probe, timeout=0.05)])
        assert found.state == "down" and reason in found.detail


async def test_the_producer_probe_is_shared_by_close_requests() -> None:
    calls = 0

    async def counted() -> bool:
        nonlocal calls
        calls += 1
        return True

    probe = broker(producer=counted, cache_seconds=3600)
    await asyncio.gather(*(probe() for _ in range(5)))
    await probe()
    assert calls == 1


async def test_a_failing_probe_counts_as_its_dependency_down() -> None:
    async def broken() -> health.Dependency:
        raise ValueError("bug")

    found = await health.check([broken])
    assert found[0].state == "down" and found[0].name == "broken"
    assert health.ready_body(found)[0] == 503


def samples(monkeypatch: pytest.MonkeyPatch, values: dict[str, float]) -> None:
    monkeypatch.setattr(health, "_sample", values.get)


@pytest.mark.parametrize(
    ("values", "state"),
    [
        ({"stockstream_warehouse_up": 1}, "up"),
        ({"stockstream_warehouse_up": 0, "stockstream_warehouse_failures_total": 0}, "starting"),
        ({"stockstream_warehouse_up": 0, "stockstream_warehouse_failures_total": 3}, "down"),
    ],
)
async def test_warehouse_state_is_reported_but_does_not_decide_readiness(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, float], state: str
) -> None:
    samples(monkeypatch, values)
    found = await health.check([broker(), lambda: health.warehouse(True)])
    status, body = health.ready_body(found)
    assert body["dependencies"]["warehouse"]["state"] == state
    assert status == 200 and body["failing"] == []


async def test_object_store_down_while_the_archive_is_blocked() -> None:
    before = REGISTRY.get_sample_value("stockstream_archive_blocked")
    ARCHIVE_BLOCKED.set(1)
    try:
        found = await health.check([broker(), lambda: health.object_store(True)])
    finally:
        ARCHIVE_BLOCKED.set(before or 0)
    status, body = health.ready_body(found)
    store = body["dependencies"]["object_store"]
    assert store["state"] == "down" and "ARCHIVE_MAX_RETRIES" in store["detail"]
    assert status == 200
    assert (await health.object_store(True)).state == "up"


async def test_disabled_dependencies_say_so() -> None:
    assert (await health.object_store(False)).state == "disabled"
    assert (await health.warehouse(False)).state == "disabled"
