"""A service in a child process of the worker (service_process.py), with real child
processes: its metrics reach the worker's page, it stops with the worker (also when the worker
is SIGKILLed), it is restarted when it dies, and a refused Kafka stops the worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from stockstream import service_process
from stockstream.child_metrics import MergedRegistry
from stockstream.kafka.clients import KafkaAccessError
from stockstream.metrics import REGISTRY
from stockstream.service_process import ServiceProcess
from stockstream.settings import Settings, load_settings

FAKES = "tests.fakes.child_services"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(environ={"STOCKSTREAM_DATA_DIR": str(tmp_path)}, dotenv_path=None)


@pytest.fixture
def metrics() -> MergedRegistry:
    # The worker's own figures start at whatever other tests left: compare differences.
    return MergedRegistry(REGISTRY)


def events(settings: Settings) -> list[tuple[str, int]]:
    path = settings.data_dir / "events"
    if not path.exists():
        return []
    return [
        (what, int(pid))
        for what, pid in (line.split() for line in path.read_text().split("\n") if line)
    ]


async def until(check: Callable[[], object], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
async def running(
    settings: Settings, metrics: MergedRegistry
) -> AsyncIterator[Callable[[str], ServiceProcess]]:
    started: list[ServiceProcess] = []

    def run(factory: str) -> ServiceProcess:
        service = ServiceProcess(settings, "fake", f"{FAKES}:{factory}", metrics=metrics)
        started.append(service)
        return service

    yield run
    for service in started:
        await service.stop()


async def test_the_childs_metrics_are_added_to_the_workers_and_it_stops_with_the_worker(
    settings: Settings, metrics: MergedRegistry, running: Callable[[str], ServiceProcess]
) -> None:
    own = REGISTRY.get_sample_value("stockstream_archive_records_total") or 0.0
    service = running("counting")
    await service.start()
    await until(lambda: metrics.get_sample_value("stockstream_archive_records_total") == own + 5)
    assert metrics.get_sample_value("stockstream_archive_blocked") == 1
    # The worker's own registry was not touched: the figures are the child's.
    assert REGISTRY.get_sample_value("stockstream_archive_records_total") == own
    [(_, pid)] = events(settings)
    assert pid != os.getpid()

    await service.stop()
    assert events(settings) == [("started", pid), ("stopped", pid)]  # a graceful stop
    assert not alive(pid)
    # A stopped child's counters stay; its gauges go.
    assert metrics.get_sample_value("stockstream_archive_records_total") == own + 5
    assert metrics.get_sample_value("stockstream_archive_blocked") == 0


async def test_a_child_that_dies_is_restarted_and_the_counters_do_not_go_down(
    settings: Settings,
    metrics: MergedRegistry,
    running: Callable[[str], ServiceProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_process, "RESTART_DELAY_SECONDS", 0.2)
    own = REGISTRY.get_sample_value("stockstream_archive_records_total") or 0.0
    service = running("exits_once")
    await service.start()
    await until(lambda: len(events(settings)) == 2)
    first, second = (pid for _, pid in events(settings))
    assert first != second
    # 5 counted by the first child (kept after it died) + 5 by the second.
    await until(lambda: metrics.get_sample_value("stockstream_archive_records_total") == own + 10)
    assert not service.crashed


async def test_a_child_refused_by_kafka_stops_the_worker_and_is_not_restarted(
    settings: Settings, running: Callable[[str], ServiceProcess]
) -> None:
    service = running("refused")
    await service.start()
    await until(lambda: service.crashed)
    assert isinstance(service.crash_reason, KafkaAccessError)
    await asyncio.sleep(0.5)
    assert len(events(settings)) == 1


PARENT = f"""
import asyncio
from prometheus_client import CollectorRegistry
from stockstream.child_metrics import MergedRegistry
from stockstream.service_process import ServiceProcess
from stockstream.settings import load_settings

async def main():
    service = ServiceProcess(
        load_settings(dotenv_path=None), "fake", "{FAKES}:counting",
        metrics=MergedRegistry(CollectorRegistry()),
    )
    await service.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_the_child_stops_when_the_worker_is_killed(settings: Settings) -> None:
    env = {**os.environ, "STOCKSTREAM_DATA_DIR": str(settings.data_dir)}
    worker = await asyncio.create_subprocess_exec(sys.executable, "-c", PARENT, env=env)
    try:
        await until(lambda: events(settings))
        [(_, child)] = events(settings)
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
        # The child reads EOF where the worker held its stdin, and stops gracefully.
        await until(lambda: ("stopped", child) in events(settings), seconds=10)
        await until(lambda: not alive(child), seconds=10)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


def test_merged_figures_add_up_per_sample_and_keep_the_workers_created_time() -> None:
    own = CollectorRegistry()
    counter = Counter("jobs", "Jobs", ["kind"], registry=own)
    counter.labels("a").inc(2)
    merged = MergedRegistry(own)
    merged.update("child", {"jobs": {("jobs_total", (("kind", "a"),)): 3.0}})
    merged.update("other", {"jobs": {("jobs_total", (("kind", "b"),)): 4.0}})
    assert merged.get_sample_value("jobs_total", {"kind": "a"}) == 5
    assert merged.get_sample_value("jobs_total", {"kind": "b"}) == 4
    created = own.get_sample_value("jobs_created", {"kind": "a"})
    assert merged.get_sample_value("jobs_created", {"kind": "a"}) == created


def test_the_worker_runs_its_archive_in_a_child_process_unless_told_inline(
    tmp_path: Path,
) -> None:
    from stockstream.application import create_app
    from stockstream.archive.archiver import Archiver
    from stockstream.kafka.consumer_service import ConsumerServiceRunner

    def archives(process: str) -> list[object]:
        env = {"STOCKSTREAM_DATA_DIR": str(tmp_path), "ARCHIVE_PROCESS": process}
        app = create_app(load_settings(environ=env, dotenv_path=None))
        found: list[object] = []
        for service in app._extra_services:
            if isinstance(service, ServiceProcess) and service.name == "archive":
                found.append(service.factory)
            elif isinstance(service, ConsumerServiceRunner) and isinstance(
                service.service, Archiver
            ):
                found.append(service.service)
        return found

    [factory] = archives("child")
    assert factory == "stockstream.archive.archiver:archiver"
    [inline] = archives("inline")
    assert isinstance(inline, Archiver)
