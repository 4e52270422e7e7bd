"""Helpers for the fault-injection tests (test_faults.py): a broker of the test's own that may
be SIGKILLed, frozen and restarted, and the figures every fault test reports.

The figures of a run: records in, windows expected (tests/reference.py over what reached the
quotes topic) and out, windows missing / duplicated / unexpected / with other values than the
reference, dead letters (deduplicated by source coordinates: the DLQ is at-least-once by design,
so its duplicates are counted and reported, not failed on) and the dead letters missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.integration.harness import Produced, Stack, Worker
from tests.integration.test_producer_spool import Broker
from tests.reference import assert_window_equal, expected_windows

WindowKey = tuple[str, int]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def broker_ports() -> int:
    """A port p for a broker that will be killed or frozen, with p + 1000 (its controller)
    free too, both below the kernel's ephemeral port range: a client reconnecting to a dead
    broker on an ephemeral port can be handed that very port as its local one and connect to
    itself (TCP simultaneous open), and the restarted broker then finds its port taken (seen
    here: `kafka.sh: error: port ... is already in use`). KAFKA_FAULT_TEST_PORT chooses it."""
    if os.environ.get("KAFKA_FAULT_TEST_PORT"):
        return int(os.environ["KAFKA_FAULT_TEST_PORT"])
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low - 1000)
        if _bindable(port) and _bindable(port + 1000):
            return port
    raise RuntimeError("no free port pair below the ephemeral range")


def _shared_libs_dir() -> Path:
    """The broker jars kafka.sh already fetched (KAFKA_LIBS_DIR, else $KAFKA_DIR/libs)."""
    if os.environ.get("KAFKA_LIBS_DIR"):
        return Path(os.environ["KAFKA_LIBS_DIR"])
    return Path(os.environ.get("KAFKA_DIR") or ROOT / ".local" / "kafka") / "libs"


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class OwnBroker(Broker):
    """A broker of the test's own (scripts/kafka.sh): a free port pair and its own KAFKA_DIR
    (data, pid file, logs) under the test's temporary directory, the jars shared with the
    session's broker. Signals go to the pid in that directory only, and only after checking
    that the process is the java process started with that directory's properties, so the
    shared broker can never be hit."""

    def __init__(self, kafka_dir: Path) -> None:
        super().__init__(broker_ports())
        self.kafka_dir = kafka_dir
        self.port = int(self._env["KAFKA_PORT"])
        self._env["KAFKA_DIR"] = str(kafka_dir)
        self._env["KAFKA_LIBS_DIR"] = str(_shared_libs_dir())

    @property
    def log_path(self) -> Path:
        return self.kafka_dir / f"broker-{self.port}.log"

    def log_count(self, text: str) -> int:
        """Lines of the broker log holding `text`."""
        if not self.log_path.exists():
            return 0
        return sum(text in line for line in self.log_path.read_text(errors="replace").splitlines())

    def _own_pid(self) -> int:
        pid = self.pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        props = str(self.kafka_dir / f"server-{self.port}.properties")
        assert props in cmdline, f"pid {pid} is not our broker: {cmdline[:200]}"
        return pid

    def sigkill(self) -> None:
        """SIGKILL, then wait until the process is gone (it is not our child)."""
        pid = self._own_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":
                    break
            time.sleep(0.1)
        # The main thread turns zombie before the JVM's other threads have exited and closed
        # their sockets: on a loaded machine the restart then found the port still taken.
        for port in (self.port, self.port + 1000):
            while _accepts(port) and time.monotonic() < deadline:
                time.sleep(0.1)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the duration of the block, SIGCONT after it (also on errors)."""
        pid = self._own_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


class ReplayProducer:
    """`stockstream produce --source replay --files <file> --speed <speed>` as a child process,
    with short producer timeouts (delivery 3 s, request 2 s, spool retry 1 s) so a broker
    outage sends it to its spool quickly."""

    def __init__(self, env: dict[str, str], source: Path, speed: float, workdir: Path) -> None:
        self.log_path = workdir / "producer.log"
        with open(self.log_path, "ab") as log:
            command = ["produce", "--source", "replay", "--files", str(source), "--speed"]
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stockstream.cli", *command, str(speed)],
                cwd=ROOT,
                env={
                    **env,
                    "PRODUCER_DELIVERY_TIMEOUT_SECONDS": "3",
                    "PRODUCER_REQUEST_TIMEOUT_MS": "2000",
                    "PRODUCER_SPOOL_RETRY_SECONDS": "1",
                    "PRODUCER_SPOOL_DIR": str(workdir / "spool"),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def done(self) -> dict[str, Any]:
        """The producer's final log record ("producer done": sent, failed, spooled, ...)."""
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if '"producer done"' in line:
                return dict(json.loads(line))
        return {}

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- figures -------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one fault run produced, against the reference."""

    fault: str
    records_in: int
    windows_expected: int
    windows_out: int
    missing: list[WindowKey]
    duplicated: list[WindowKey]  # one entry per surplus copy
    unexpected: list[WindowKey]
    wrong: list[str]  # windows whose values differ from the reference
    dead_letters: int  # distinct source records in the DLQ
    dead_letters_expected: int
    dead_letters_missing: list[tuple[int, int]]
    dead_letters_unexpected: list[tuple[int, int]]
    dlq_duplicates: int
    started: float
    more: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        more = "".join(f", {name}={value}" for name, value in self.more.items())
        return (
            f"FAULT {self.fault}: records_in={self.records_in},"
            f" windows_expected={self.windows_expected}, windows_out={self.windows_out},"
            f" missing={len(self.missing)}, duplicated={len(self.duplicated)},"
            f" unexpected={len(self.unexpected)}, wrong_values={len(self.wrong)},"
            f" dead_letters={self.dead_letters}/{self.dead_letters_expected}"
            f" (missing {len(self.dead_letters_missing)},"
            f" dlq duplicates={self.dlq_duplicates}){more},"
            f" elapsed={time.monotonic() - self.started:.1f}s"
        )

    def details(self) -> str:
        return (
            f"{self.line()}\n  missing windows: {sorted(self.missing)[:10]}"
            f"\n  duplicated windows: {sorted(self.duplicated)[:10]}"
            f"\n  unexpected windows: {sorted(self.unexpected)[:10]}"
            f"\n  wrong values: {self.wrong[:3]}"
            f"\n  dead letters missing: {sorted(self.dead_letters_missing)[:10]}"
            f"\n  dead letters unexpected: {sorted(self.dead_letters_unexpected)[:10]}"
        )


def figures(
    fault: str,
    started: float,
    records_in: int,
    windows: list[Any],
    dlq: list[Any],
    produced: Produced,
    stack: Stack,
    **more: Any,
) -> Figures:
    """`windows` and `dlq` as `harness.read_all` returns them; `produced` is what reached the
    quotes topic (valid records with coordinates, and the coordinates of invalid ones)."""
    expected, late = expected_windows(produced.records)
    keys = Counter((v["symbol"], v["window_start_ms"]) for _, _, _, v, _ in windows)
    wrong: list[str] = []
    for _, _, _, value, _ in windows:
        want = expected.get((value["symbol"], value["window_start_ms"]))
        if want is not None:
            try:
                assert_window_equal(value, want)
            except AssertionError as exc:
                wrong.append(str(exc)[:300])
    dead = Counter((v["partition"], v["offset"]) for _, _, _, v, _ in dlq)
    want_dead = {(r.partition, r.offset) for r in late} | set(produced.invalid)
    return Figures(
        fault=fault,
        records_in=records_in,
        windows_expected=len(expected),
        windows_out=len(windows),
        missing=sorted(set(expected) - set(keys)),
        duplicated=[k for k, n in keys.items() for _ in range(n - 1)],
        unexpected=sorted(set(keys) - set(expected)),
        wrong=wrong,
        dead_letters=len(dead),
        dead_letters_expected=len(want_dead),
        dead_letters_missing=sorted(want_dead - set(dead)),
        dead_letters_unexpected=sorted(set(dead) - want_dead),
        dlq_duplicates=sum(dead.values()) - len(dead),
        started=started,
        more=more,
    )


def report(fig: Figures, *workers: Worker | None, zero: Sequence[str] = ()) -> None:
    """Print the figures line; assert every window exactly once with the reference values,
    every invalid or late record dead-lettered and each of `zero` (names of `fig.more`) 0
    (message: the figures and the workers' log tails)."""
    print(fig.line(), flush=True)
    ok = not (
        fig.missing
        or fig.duplicated
        or fig.unexpected
        or fig.wrong
        or fig.dead_letters_missing
        or fig.dead_letters_unexpected
        or any(fig.more[name] for name in zero)
    )
    if not ok:
        logs = "\n".join(f"--- {w.log_path.name}:\n{w.tail(15)}" for w in workers if w)
        raise AssertionError(f"{fig.details()}\n{logs}")
