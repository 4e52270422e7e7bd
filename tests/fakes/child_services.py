"""Services for tests/unit/test_service_process.py, built in the child process by the factories
below (`module:function` paths, as the worker names the archive's). Each writes what happened
to files under STOCKSTREAM_DATA_DIR, the only thing the test can see of the child."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from stockstream.deadletter import DeadLetters
from stockstream.kafka.clients import KafkaAccessError
from stockstream.metrics import ARCHIVE_BLOCKED, ARCHIVE_RECORDS
from stockstream.settings import Settings


class _Fake:
    name = "fake"
    topic = "stock-quotes"

    def __init__(self, settings: Settings) -> None:
        self.dir = Path(settings.data_dir)

    def note(self, what: str) -> None:
        with (self.dir / "events").open("a") as out:
            out.write(f"{what} {os.getpid()}\n")


class Counting(_Fake):
    """Counts 5 archived records, sets the blocked gauge, then waits; notes its stop."""

    async def run(self) -> None:
        self.note("started")
        ARCHIVE_RECORDS.inc(5)
        ARCHIVE_BLOCKED.set(1)
        try:
            await asyncio.Event().wait()
        finally:
            self.note("stopped")


class ExitsOnce(_Fake):
    """The first child dies outright (as on an OOM kill); the next one counts like `Counting`."""

    async def run(self) -> None:
        started = (self.dir / "events").exists()
        self.note("started")
        ARCHIVE_RECORDS.inc(5)
        if not started:
            await asyncio.sleep(1.5)  # long enough for a metrics snapshot to reach the worker
            os._exit(3)
        await asyncio.Event().wait()


class Refused(_Fake):
    async def run(self) -> None:
        self.note("started")
        raise KafkaAccessError("Kafka refused the credentials")


def counting(settings: Settings, dead_letters: DeadLetters) -> Counting:
    return Counting(settings)


def exits_once(settings: Settings, dead_letters: DeadLetters) -> ExitsOnce:
    return ExitsOnce(settings)


def refused(settings: Settings, dead_letters: DeadLetters) -> Refused:
    return Refused(settings)
