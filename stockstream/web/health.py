"""The worker's dependencies and their states, for `/health/` and `/ready/`.

- broker (needed for readiness): the aggregation's consumer has partitions of the quotes topic
  and is not rebalancing, and the worker's producer gets an answer from the cluster (a metadata
  request, at most one per `PRODUCER_PROBE_CACHE_SECONDS` whatever the request rate).
- object store (reported, not needed for readiness): `down` while the archive's storage keeps
  failing beyond ARCHIVE_MAX_RETRIES (`stockstream_archive_blocked`), `disabled` with
  ARCHIVE_ENABLED=false.
- warehouse (reported, not needed for readiness): `stockstream_warehouse_up`; `starting` until
  the loader's first poll, `down` while writes fail, `disabled` with WAREHOUSE_ENABLED=false.

Why only the broker decides readiness: the archive and the warehouse loader have consumer
groups of their own and wait out their outages with Kafka keeping the data (README, "Failure
modes"); the aggregation goes on meanwhile, and neither taking this worker out of service nor
restarting it would bring the storage back. Their states are still listed (and alerted on through
the metrics) so an operator sees them in one place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stockstream.child_metrics import WORKER_METRICS

State = Literal["up", "down", "starting", "disabled"]
Probe = Callable[[], Awaitable["Dependency"]]

# Below the 2 s the test harness (and many probes) wait for an answer.
PRODUCER_PROBE_TIMEOUT_SECONDS = 1.0
PRODUCER_PROBE_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class Dependency:
    name: str
    state: State
    detail: str
    needed_for_ready: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def failing(self) -> bool:
        return self.needed_for_ready and self.state != "up"

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "detail": self.detail,
            "needed_for_ready": self.needed_for_ready,
            **self.info,
        }


class BrokerProbe:
    """The broker as the aggregation sees it (module doc)."""

    def __init__(
        self,
        assigned: Callable[[], list[int]],
        rebalancing: Callable[[], bool],
        producer_reachable: Callable[[], Awaitable[bool]],
        *,
        timeout: float = PRODUCER_PROBE_TIMEOUT_SECONDS,
        cache_seconds: float = PRODUCER_PROBE_CACHE_SECONDS,
    ) -> None:
        self._assigned = assigned
        self._rebalancing = rebalancing
        self._reachable = producer_reachable
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._last: tuple[float, bool, str] | None = None
        self._lock = asyncio.Lock()

    async def _producer(self) -> tuple[bool, str]:
        async with self._lock:  # concurrent probes share one request
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self._cache_seconds:
                return self._last[1], self._last[2]
            try:
                ok = await asyncio.wait_for(self._reachable(), self._timeout)
                why = "reachable" if ok else "no broker answered a metadata request"
            except TimeoutError:
                ok, why = False, f"no answer within {self._timeout:g} s"
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"[:300]
            self._last = (time.monotonic(), ok, why)
            return ok, why

    async def __call__(self) -> Dependency:
        partitions, rebalancing = self._assigned(), self._rebalancing()
        producer_ok, producer = await self._producer()
        problems = []
        if not partitions:
            problems.append("the consumer has no partition of the quotes topic")
        if rebalancing:
            problems.append("the consumer group is rebalancing")
        if not producer_ok:
            problems.append(f"producer: {producer}")
        return Dependency(
            "broker",
            "down" if problems else "up",
            "; ".join(problems) or "consumer assigned, producer reachable",
            needed_for_ready=True,
            info={"partitions": partitions, "rebalancing": rebalancing, "producer": producer},
        )


def _sample(name: str) -> float | None:
    return WORKER_METRICS.get_sample_value(name)


async def object_store(enabled: bool) -> Dependency:
    """The archive's object store, from the archive's metrics (module doc)."""
    if not enabled:
        return Dependency("object_store", "disabled", "ARCHIVE_ENABLED=false", False)
    last = _sample("stockstream_archive_last_success_timestamp_seconds") or None
    info = {"last_success_age_seconds": round(time.time() - last, 1) if last else None}
    if _sample("stockstream_archive_blocked") == 1:
        detail = "storage keeps failing beyond ARCHIVE_MAX_RETRIES; the archive waits"
        return Dependency("object_store", "down", detail, False, info)
    return Dependency("object_store", "up", "no storage call failing", False, info)


async def warehouse(enabled: bool) -> Dependency:
    """The warehouse, from the loader's metrics (module doc)."""
    if not enabled:
        return Dependency("warehouse", "disabled", "WAREHOUSE_ENABLED=false", False)
    pending = _sample("stockstream_warehouse_pending_rows")
    info = {"pending_rows": int(pending) if pending is not None else None}
    if _sample("stockstream_warehouse_up") == 1:
        return Dependency("warehouse", "up", "writes succeed", False, info)
    if not _sample("stockstream_warehouse_failures_total"):
        return Dependency("warehouse", "starting", "the loader has not polled yet", False, info)
    return Dependency("warehouse", "down", "writes fail; the batch is retried", False, info)


async def check(probes: Sequence[Probe]) -> list[Dependency]:
    """Every dependency's state; a probe that fails is reported as that dependency down."""
    results = await asyncio.gather(*(probe() for probe in probes), return_exceptions=True)
    found: list[Dependency] = []
    for probe, result in zip(probes, results, strict=True):
        if isinstance(result, Dependency):
            found.append(result)
        else:
            name = getattr(probe, "__name__", type(probe).__name__)
            found.append(Dependency(name, "down", f"probe failed: {result!r}"[:300], True))
    return found


def health_body(app_id: str, dependencies: Sequence[Dependency]) -> dict[str, Any]:
    """Liveness: answered while the event loop runs, whatever the dependencies' states."""
    return {
        "status": "ok",
        "app": app_id,
        "dependencies": {d.name: d.to_json() for d in dependencies},
    }


def ready_body(dependencies: Sequence[Dependency]) -> tuple[int, dict[str, Any]]:
    """Readiness: 503 naming every dependency it needs that is not up."""
    failing = [d.name for d in dependencies if d.failing]
    body: dict[str, Any] = {
        "ready": not failing,
        "failing": failing,
        "dependencies": {d.name: d.to_json() for d in dependencies},
    }
    broker = next((d for d in dependencies if d.name == "broker"), None)
    if broker is not None:  # the fields /ready/ always had
        body["partitions"] = broker.info.get("partitions", [])
        body["rebalancing"] = broker.info.get("rebalancing", False)
    return (503 if failing else 200), body
