"""A BigQuery emulator for the warehouse tests: `bqemulator` (PyPI) started on loopback.

The real `google-cloud-bigquery` client talks to it over REST (`BQ_API_ENDPOINT`). It is
launched through a small wrapper around its own CLI with two patches:

- At start-up bqemulator 1.4 runs `INSTALL spatial; LOAD spatial` (a download from
  extensions.duckdb.org) and exits when that fails, e.g. offline; it has no option to skip
  it, so the wrapper skips the spatial load (GEOGRAPHY is not used here).
  `BQEMU_ENABLE_FORMAT_EXTENSIONS=false` avoids the (best-effort) Avro download too.
- With DuckDB 2.0 a query result left unfetched on the emulator's shared connection makes
  every later `insertAll` fail with HTTP 500 (`ResourceInUseException: connection has an
  unfinished result`): after any read (`tabledata.list`) or after a restart (catalog
  hydration). The wrapper completes such a leftover result when a write takes the engine's
  write lock.

Persistent mode (a data dir), so a stopped and restarted emulator keeps its tables and rows.
Its pytest plugin (which wants Docker) is disabled in pyproject (`-p no:bqemulator`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.s3_server import SeaweedS3

PROJECT = "test-project"

# bqemulator's own CLI with two patches (see the module docstring): no spatial extension, and
# leftover query results completed before each write.
_LAUNCHER = """
import sys
from contextlib import asynccontextmanager
from bqemulator.storage.engine import DuckDBEngine

DuckDBEngine._load_spatial = lambda self: None
_write_lock = DuckDBEngine.write_lock

@asynccontextmanager
async def write_lock(self):
    async with _write_lock(self):
        if self._connection is not None:
            self._connection.complete()
        yield

DuckDBEngine.write_lock = write_lock
from bqemulator.cli import main
sys.argv[0] = "bqemulator"
main()
"""


class BigQueryEmulator:
    """One emulator process; `stop()` and `start()` again keep port, data and tables."""

    def __init__(self, workdir: Path, project: str = PROJECT) -> None:
        self.workdir = workdir
        self.project = project
        self.port = free_port()
        self.grpc_port = free_port()
        self.log_path = workdir / "bqemulator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The worker's settings for this emulator."""
        return {
            "WAREHOUSE_BACKEND": "bigquery",
            "BQ_API_ENDPOINT": self.url,
            "BQ_PROJECT": self.project,
        }

    def start(self, timeout: float = 90.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _LAUNCHER,
                    "start",
                    "--rest-host",
                    "127.0.0.1",
                    "--rest-port",
                    str(self.port),
                    "--grpc-host",
                    "127.0.0.1",
                    "--grpc-port",
                    str(self.grpc_port),
                    "--project",
                    self.project,
                    "--persistent",
                    "--data-dir",
                    str(self.workdir / "data"),
                    "--log-format",
                    "json",
                    "--log-level",
                    "warning",
                ],
                env={**os.environ, "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false"},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bqemulator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"bqemulator not ready after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigQueryEmulator]:
    """One emulator for the session; tests isolate themselves with their own dataset."""
    emulator = BigQueryEmulator(tmp_path_factory.mktemp("bqemulator"))
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def own_bq_emulator(tmp_path: Path) -> Iterator[BigQueryEmulator]:
    """An emulator of the test's own, for tests that stop and restart it."""
    emulator = BigQueryEmulator(tmp_path / "bqemulator")
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A fresh S3 server (SeaweedFS) for one test: archive, faults and dbt tests."""
    server = SeaweedS3(tmp_path / "s3")
    server.start()
    try:
        yield server
    finally:
        server.stop()
