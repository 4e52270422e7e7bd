"""Throughput of the aggregation worker against a real broker, next to a plain consumer.

    python benchmarks/aggregate_throughput.py [--quotes 500000] [--symbols 200]
        [--partitions 3] [--bootstrap HOST:PORT] [--store rocksdb://|memory://]
        [--span-minutes 10] [--profile [--profiler py-spy|pyinstrument]]
        [--env NAME=VALUE ...] [--keep]

1. Preloads N seeded simulator quotes (event time spread over --span-minutes, in the past)
   into fresh, uniquely named, co-partitioned topics; counts the expected windows.
2. Baseline: a plain aiokafka consumer reads the N records and orjson-decodes each value.
3. Starts `python -m faust -A stockstream worker` on those topics (earliest offset) and
   measures, from readiness (/ready/ = 200): all N quotes processed (/metrics/
   stockstream_quotes_total) and all expected windows in the aggregated topic (end offsets,
   i.e. including the idle flush of the last windows). Also startup time, the worker's CPU
   time while processing and its peak RSS.
4. Checks the output: windows expected vs emitted, no duplicate (symbol, window_start_ms),
   and the window counts add up to N.

Prints figures, never fails on them. Without --bootstrap it starts the project's broker
(scripts/kafka.sh on port 29092) and stops it again if it started it. With --profile the
worker is sampled during the processing phase only (py-spy from outside if installed, else
pyinstrument inside it via benchmarks/profiled_worker.py) and worker_profile.py prints where
the time goes. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from contenders.progress import read as read_progress
from worker_profile import Sample, load_pyinstrument, load_pyspy_raw, print_summary

from stockstream.kafka.topics import ensure_topics
from stockstream.settings import Settings, load_settings
from stockstream.sources.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
PROFILED_WORKER = Path(__file__).resolve().parent / "profiled_worker.py"
BENCH_KAFKA_PORT = 29092
BENCH_CONTROLLER_PORT = 30092
# Must match profiled_worker.py (mode's worker owns SIGINT/SIGTERM/SIGUSR1/SIGUSR2).
PROFILE_START_SIGNAL = int(signal.SIGRTMIN)
PROFILE_STOP_SIGNAL = PROFILE_START_SIGNAL + 1
PROFILE_SAVE_SIGNAL = PROFILE_START_SIGNAL + 2
PYSPY_RATE_HZ = 200
IDLE_TIMEOUT_S = 2.0
# Scraping /metrics/ costs the worker; every 0.5 s it is under 1% of its time.
POLL_S = 0.5
SEED = 20240607
QUOTES_METRIC = re.compile(rb'^stockstream_quotes_total\{outcome="([^"]*)"\} (\S+)$', re.M)
EMITTED_METRIC = re.compile(
    rb'^stockstream_windows_emitted_total\{trigger="([^"]*)"\} (\S+)$', re.M
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def code_version() -> str:
    """The commit, and a digest of uncommitted changes under stockstream/ (others edit it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "stockstream"], cwd=ROOT, capture_output=True
        ).stdout
    except OSError:
        return "unknown"
    if not head:
        return "not a git checkout"
    if not diff:
        return f"git {head}, stockstream/ clean"
    digest = hashlib.sha1(diff).hexdigest()[:10]
    return f"git {head} + uncommitted stockstream/ changes (diff sha1 {digest})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- broker


class Broker:
    """The project's single-node broker on the benchmark port, unless --bootstrap is given."""

    def __init__(self, bootstrap: str | None) -> None:
        self.bootstrap = bootstrap or f"127.0.0.1:{BENCH_KAFKA_PORT}"
        self.manage = bootstrap is None
        self.started_here = False
        self._env = {
            **os.environ,
            "KAFKA_PORT": str(BENCH_KAFKA_PORT),
            "KAFKA_CONTROLLER_PORT": str(BENCH_CONTROLLER_PORT),
        }

    def start(self) -> None:
        if not self.manage:
            return
        status = subprocess.run(
            [str(KAFKA_SH), "status"], env=self._env, capture_output=True, text=True
        )
        if status.returncode == 0:
            log(f"broker already running on {self.bootstrap}: using it, will not stop it")
            return
        log(f"starting broker on {self.bootstrap} (scripts/kafka.sh)")
        out = subprocess.run(
            [str(KAFKA_SH), "start"],
            env=self._env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            timeout=300,
        )
        self.started_here = True
        self.bootstrap = out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        if self.started_here:
            log("stopping the broker this run started")
            subprocess.run([str(KAFKA_SH), "stop"], env=self._env, check=False, timeout=120)


# ----------------------------------------------------------------------------- run setup


@dataclass
class Run:
    bootstrap: str
    partitions: int
    store: str
    data_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    web_port: int = field(default_factory=free_port)
    # Contenders read the preloaded topic of the first run, each with its own output topics.
    shared_quotes: str | None = None

    def sibling(self, extra_env: dict[str, str]) -> Run:
        """Another run on the same preloaded quotes: own ids, output topics and data dir."""
        run = Run(self.bootstrap, self.partitions, self.store, self.data_dir, extra_env)
        run.data_dir = self.data_dir / run.run_id
        run.data_dir.mkdir(parents=True)
        run.shared_quotes = self.quotes_topic
        return run

    @property
    def quotes_topic(self) -> str:
        return self.shared_quotes or f"bench-quotes-{self.run_id}"

    @property
    def aggregated_topic(self) -> str:
        return f"bench-aggregated-{self.run_id}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "STOCKSTREAM_ENV": "dev",
            "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_QUOTES_TOPIC": self.quotes_topic,
            "KAFKA_AGGREGATED_TOPIC": self.aggregated_topic,
            "KAFKA_DLQ_TOPIC": f"bench-dlq-{self.run_id}",
            "KAFKA_ANOMALIES_TOPIC": f"bench-anomalies-{self.run_id}",
            "KAFKA_PARTITIONS": str(self.partitions),
            "STOCKSTREAM_APP_ID": f"bench-{self.run_id}",
            "STOCKSTREAM_DATA_DIR": str(self.data_dir),
            "STOCKSTREAM_WEB_PORT": str(self.web_port),
            "STOCKSTREAM_STORE": self.store,
            "STOCKSTREAM_AUTO_OFFSET_RESET": "earliest",
            "AGG_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT_S),
            "AGG_IDLE_CHECK_SECONDS": "0.5",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "text",
            # The aggregation alone; `--env ARCHIVE_ENABLED=true` etc. measures the whole worker.
            "ARCHIVE_ENABLED": "false",
            "WAREHOUSE_ENABLED": "false",
            "ARCHIVE_LOCAL_DIR": str(self.data_dir / "archive"),
            "DUCKDB_PATH": str(self.data_dir / "warehouse.duckdb"),
            **self.extra_env,
        }

    def settings(self) -> Settings:
        return load_settings(environ=self.env(), dotenv_path=None)


async def delete_run_topics(run: Run) -> None:
    """Every topic of this run: ours and Faust's (changelog, assignor leader)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=run.bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if run.run_id in t]
        if names:
            await admin.delete_topics(names)
            log(f"deleted {len(names)} topics of run {run.run_id}")
    finally:
        await admin.close()


# ----------------------------------------------------------------------------- preload


@dataclass
class Preloaded:
    quotes: int
    windows: set[tuple[str, int]]
    first_ms: int
    last_ms: int
    seconds: float
    nbytes: int


def quotes_to_send(
    count: int, symbols: int, span_minutes: float, window_ms: int
) -> tuple[Iterator[tuple[bytes, bytes]], Preloaded]:
    """Serialized (key, value) pairs, and a Preloaded that fills in while they are consumed."""
    span_ms = int(span_minutes * 60_000)
    now_ms = int(time.time() * 1000)
    start_ms = (now_ms - span_ms - 30 * 60_000) // 60_000 * 60_000  # minute-aligned, past
    rate = count / (span_ms / 1000)
    sim = Simulator(symbols=symbols, seed=SEED, rate=rate, start_ms=start_ms)
    info = Preloaded(count, set(), -1, -1, 0.0, 0)

    def gen() -> Iterator[tuple[bytes, bytes]]:
        for quote in sim.quotes(count):
            ts = quote.market_timestamp
            if info.first_ms < 0:
                info.first_ms = ts
            info.last_ms = ts
            info.windows.add((quote.symbol, ts - ts % window_ms))
            value = quote.to_json()
            info.nbytes += len(value)
            yield quote.symbol.encode(), value

    return gen(), info


async def preload(run: Run, args: argparse.Namespace) -> Preloaded:
    settings = run.settings()
    await ensure_topics(settings)
    pairs, info = quotes_to_send(
        args.quotes, args.symbols, args.span_minutes, settings.aggregation.window_seconds * 1000
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=run.bootstrap,
        acks=1,
        linger_ms=50,
        max_batch_size=1 << 20,
        max_request_size=8 << 20,
        compression_type="lz4",
    )
    await producer.start()
    started = time.perf_counter()
    try:
        # Batch API: one builder per partition, partition by the key as Kafka's default
        # partitioner does (murmur2), so each symbol's quotes share a partition.
        partitioner = DefaultPartitioner()
        all_partitions = list(range(run.partitions))
        partition_of: dict[bytes, int] = {}
        builders: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for key, value in pairs:
            partition = partition_of.get(key)
            if partition is None:
                partition = partitioner(key, all_partitions, all_partitions)
                partition_of[key] = partition
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                futures.append(
                    await producer.send_batch(builder, run.quotes_topic, partition=partition)
                )
                builder = builders[partition] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None)
        for partition, builder in builders.items():
            if builder.record_count():
                futures.append(
                    await producer.send_batch(builder, run.quotes_topic, partition=partition)
                )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    info.seconds = time.perf_counter() - started
    return info


# ----------------------------------------------------------------------------- kafka reads


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return int(sum((await consumer.end_offsets(tps)).values()))
    finally:
        await consumer.stop()


async def baseline(run: Run, count: int, timeout_s: float) -> tuple[int, float]:
    """Plain consumer: (records read, seconds) for reading and JSON-decoding `count` quotes."""
    consumer = AIOKafkaConsumer(
        run.quotes_topic,
        bootstrap_servers=run.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    read = 0
    try:
        started = time.perf_counter()
        deadline = started + timeout_s
        while read < count and time.perf_counter() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    orjson.loads(record.value)
                read += len(records)
        return read, time.perf_counter() - started
    finally:
        await consumer.stop()


@dataclass
class OutputCheck:
    records: int
    distinct: int
    duplicates: list[tuple[str, int]]
    missing: list[tuple[str, int]]
    extra: list[tuple[str, int]]
    quotes_counted: int


async def read_output(run: Run, expected: set[tuple[str, int]]) -> OutputCheck:
    """Every record of the aggregated topic up to its current end offsets."""
    tps = [TopicPartition(run.aggregated_topic, p) for p in range(run.partitions)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=run.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    keys: Counter[tuple[str, int]] = Counter()
    quotes_counted = 0
    records = 0
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp, begin in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, begin)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                for record in batch:
                    data = orjson.loads(record.value)
                    keys[(data["symbol"], int(data["window_start_ms"]))] += 1
                    quotes_counted += int(data["count"])
                    records += 1
    finally:
        await consumer.stop()
    seen = set(keys)
    return OutputCheck(
        records=records,
        distinct=len(seen),
        duplicates=sorted(k for k, n in keys.items() if n > 1),
        missing=sorted(expected - seen),
        extra=sorted(seen - expected),
        quotes_counted=quotes_counted,
    )


# ----------------------------------------------------------------------------- the worker


def pyspy_path() -> str | None:
    found = shutil.which("py-spy")
    beside = Path(sys.executable).with_name("py-spy")
    return found or (str(beside) if beside.exists() else None)


class Profiling:
    """Samples the worker during the processing phase only (start() at readiness, stop() when
    every quote is counted). py-spy samples from outside the process (no overhead in the
    worker); pyinstrument runs inside it (benchmarks/profiled_worker.py) and slows it down."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        suffix = "pyspy.txt" if kind == "py-spy" else "pyisession"
        self.output = data_dir / f"worker.{suffix}"
        self._log_path = data_dir / "py-spy.log"
        self._spy: subprocess.Popen[bytes] | None = None

    def command(self, faust_args: list[str]) -> list[str]:
        if self.kind == "pyinstrument":
            return [sys.executable, str(PROFILED_WORKER), str(self.output), "--", *faust_args]
        return [sys.executable, "-m", "faust", *faust_args]

    def start(self, pid: int) -> None:
        if self.kind == "pyinstrument":
            os.kill(pid, PROFILE_START_SIGNAL)
            return
        spy = pyspy_path()
        assert spy is not None
        with open(self._log_path, "ab") as out:
            self._spy = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(PYSPY_RATE_HZ),
                 "--format", "raw", "--full-filenames", "--idle", "--nonblocking", "--threads",
                 "--output", str(self.output)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self, pid: int) -> None:
        """Stop sampling; cheap for the worker (pyinstrument keeps its session in memory)."""
        if self.kind == "pyinstrument":
            os.kill(pid, PROFILE_STOP_SIGNAL)
        elif self._spy is not None and self._spy.poll() is None:
            self._spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C

    async def collect(self, pid: int, alive: bool) -> list[Sample] | None:
        """Have the profile written (blocks the worker's loop for pyinstrument) and load it."""
        deadline = time.perf_counter() + 300
        if self.kind == "pyinstrument":
            if alive:
                os.kill(pid, PROFILE_SAVE_SIGNAL)
            # Written from a signal handler in the worker: nothing to wait on but the file.
            while not self.output.exists() and time.perf_counter() < deadline:
                await asyncio.sleep(0.5)
        elif self._spy is not None:
            await asyncio.to_thread(self._spy.wait, 300)
        if not self.output.exists():
            log(f"the profiler wrote no {self.output.name}")
            if self._log_path.exists():
                log(self._log_path.read_text(errors="replace")[-2000:])
            return None
        if self.kind == "pyinstrument":
            return load_pyinstrument(self.output)
        return load_pyspy_raw(self.output, PYSPY_RATE_HZ)

    def kill(self) -> None:
        if self._spy is not None and self._spy.poll() is None:
            self._spy.kill()
            self._spy.wait()


class Process:
    """A contender's process, with its output in `log_path`."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def pids(self) -> list[int]:
        """The worker and its live child processes (the archive runs in one by default)."""
        found = [self.proc.pid]
        for pid in found:  # grows while it is walked: children of children
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                try:
                    found.extend(int(child) for child in task.read_text().split())
                except OSError:
                    continue
        return found

    def peak_rss_mb(self) -> float | None:
        """VmHWM (peak resident set size) of the worker plus that of its child processes."""
        return status_mb(self.pids(), "VmHWM")

    def cpu_seconds(self) -> float | None:
        """User + system CPU time so far of the worker and of its live child processes."""
        total = None
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the command name: state is field 3, utime and stime are fields 14 and 15.
            total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log("worker did not stop within 60 s after SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def status_mb(pids: list[int], field: str) -> float | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM) summed over `pids`, in MB; None
    when none of them could be read."""
    total = None
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(f"{field}:"):
                total = (total or 0.0) + int(line.split()[1]) / 1024
    return total


class WorkerProcess(Process):
    def __init__(
        self, run: Run, log_path: Path, profiling: Profiling | None, loop: str = "aio"
    ) -> None:
        faust_args = ["-A", "stockstream", "-L", loop, "worker", "-l", "warn"]
        if profiling is None:
            cmd = [sys.executable, "-m", "faust", *faust_args]
        else:
            cmd = profiling.command(faust_args)
        self.port = run.web_port
        self.profiling = profiling
        super().__init__(cmd, run.env(), ROOT, log_path)


class WorkerGone(RuntimeError):
    pass


async def http_get(session: aiohttp.ClientSession, port: int, path: str) -> tuple[int, bytes]:
    async with session.get(
        f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)
    ) as resp:
        return resp.status, await resp.read()


@dataclass
class Metrics:
    quotes: dict[str, float]
    emitted: dict[str, float]

    @property
    def quotes_total(self) -> int:
        return int(sum(self.quotes.values()))


async def scrape(session: aiohttp.ClientSession, worker: WorkerProcess) -> Metrics:
    status, body = await http_get(session, worker.port, "/metrics/")
    if status != 200:
        raise RuntimeError(f"/metrics/ answered {status}")
    return Metrics(
        quotes={m[1].decode(): float(m[2]) for m in QUOTES_METRIC.finditer(body)},
        emitted={m[1].decode(): float(m[2]) for m in EMITTED_METRIC.finditer(body)},
    )


async def wait_ready(session: aiohttp.ClientSession, worker: WorkerProcess, limit_s: float) -> None:
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        if not worker.alive():
            raise WorkerGone(f"worker exited with {worker.proc.returncode}")
        try:
            status, _ = await http_get(session, worker.port, "/ready/")
            if status == 200:
                return
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"worker not ready after {limit_s:.0f} s")


@dataclass
class WorkerResult:
    startup_s: float
    processed_at_ready: int
    span: Span
    e2e_s: float | None
    emitted_records: int
    metrics: Metrics | None
    dlq_records: int
    peak_rss_mb: float | None
    output: OutputCheck | None
    samples: list[Sample] | None


@dataclass
class Span:
    """A contender's processing phase: from the first poll that saw a record processed (so
    startup and partition assignment are left out for every contender alike) to the first
    that saw all of them, with the process's CPU time in between."""

    started: float
    start_count: int
    records: int
    seconds: float | None
    cpu_s: float | None
    peak_rss_mb: float | None

    @property
    def ended(self) -> float:
        return self.started + (self.seconds or 0.0)

    @property
    def rate(self) -> float | None:
        return self.records / self.seconds if self.seconds else None

    @property
    def cpu_us_per_record(self) -> float | None:
        if self.cpu_s is None or not self.records:
            return None
        return 1e6 * self.cpu_s / self.records


async def follow(
    count: Callable[[], Awaitable[int]], proc: Process, n: int, deadline_s: float
) -> Span:
    """Poll `count` until it reaches `n`; the Span of the processing phase."""
    t_begin = time.perf_counter()
    deadline = t_begin + deadline_s
    first: tuple[float, int, float | None] | None = None
    last_report = t_begin
    while time.perf_counter() < deadline:
        if not proc.alive():
            raise WorkerGone(f"process exited with {proc.proc.returncode}")
        done = await count()
        now = time.perf_counter()
        if first is None and done > 0:
            first = (now, done, proc.cpu_seconds())
        if first is not None and done >= n:
            cpu = proc.cpu_seconds()
            cpu_s = None if cpu is None or first[2] is None else cpu - first[2]
            log(f"all {n} records processed after {now - t_begin:.1f} s")
            return Span(first[0], first[1], n - first[1], now - first[0], cpu_s, proc.peak_rss_mb())
        if now - last_report >= 10:
            last_report = now
            log(f"  {done}/{n} records processed")
        await asyncio.sleep(POLL_S)
    log("WARNING: not every record was processed before the deadline")
    t0, c0 = (first[0], first[1]) if first else (t_begin, 0)
    return Span(t0, c0, n - c0, None, None, proc.peak_rss_mb())


async def measure_worker(
    run: Run, worker: WorkerProcess, info: Preloaded, expected_windows: int
) -> WorkerResult:
    n = info.quotes
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, worker, limit_s=180)
        t_ready = time.perf_counter()
        startup = t_ready - worker.started
        if worker.profiling is not None:
            worker.profiling.start(worker.proc.pid)
        at_ready = (await scrape(session, worker)).quotes_total
        log(f"worker ready after {startup:.1f} s ({at_ready} quotes already processed)")

        # Processing: every quote counted by the agent.
        metrics: Metrics | None = None

        async def counted() -> int:
            nonlocal metrics
            metrics = await scrape(session, worker)
            return metrics.quotes_total

        span = await follow(counted, worker, n, deadline_s=max(600.0, n / 200))
        if worker.profiling is not None:
            worker.profiling.stop(worker.proc.pid)

        # End to end: every expected window in the output topic (idle flush included).
        t_e2e: float | None = None
        emitted = 0
        deadline = time.perf_counter() + 120 + 10 * IDLE_TIMEOUT_S
        while time.perf_counter() < deadline:
            emitted = await end_offsets(run.bootstrap, run.aggregated_topic, run.partitions)
            if emitted >= expected_windows:
                t_e2e = time.perf_counter()
                break
            await asyncio.sleep(POLL_S)
        if t_e2e is None:
            log(f"WARNING: only {emitted}/{expected_windows} windows arrived before the deadline")
        else:
            log(f"all {expected_windows} windows in the output after {t_e2e - span.started:.1f} s")

        # Settle: give duplicates (a second idle flush, ...) a chance to show up.
        await asyncio.sleep(max(3.0, 2 * IDLE_TIMEOUT_S))
        metrics = await scrape(session, worker)
        emitted = await end_offsets(run.bootstrap, run.aggregated_topic, run.partitions)
        dlq = await end_offsets(run.bootstrap, f"bench-dlq-{run.run_id}", run.partitions)
        rss = worker.peak_rss_mb()

    output = await read_output(run, info.windows)
    samples = None
    if worker.profiling is not None:
        samples = await worker.profiling.collect(worker.proc.pid, worker.alive())
    return WorkerResult(
        startup_s=startup,
        processed_at_ready=at_ready,
        span=span,
        e2e_s=None if t_e2e is None else t_e2e - span.started,
        emitted_records=emitted,
        metrics=metrics,
        dlq_records=dlq,
        peak_rss_mb=rss,
        output=output,
        samples=samples,
    )


# ----------------------------------------------------------------------------- main


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quotes", type=int, default=500_000, help="quotes to preload (500000)")
    p.add_argument("--symbols", type=int, default=200, help="distinct symbols (200)")
    p.add_argument("--partitions", type=int, default=3, help="partitions per topic (3)")
    p.add_argument(
        "--span-minutes",
        type=float,
        default=10.0,
        help="event-time span of the quotes, minutes (10)",
    )
    p.add_argument(
        "--bootstrap",
        default=None,
        help="use this broker (default: scripts/kafka.sh on port 29092)",
    )
    p.add_argument("--store", default="rocksdb://", choices=["rocksdb://", "memory://"])
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the worker under pyinstrument, print where the time goes",
    )
    p.add_argument(
        "--profiler",
        choices=["auto", "py-spy", "pyinstrument"],
        default="auto",
        help="auto (default): py-spy if installed (no overhead in the worker), else\n"
        "pyinstrument (in-process: slows the worker down several times)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        type=env_pair,
        metavar="NAME=VALUE",
        help="extra environment for the worker, repeatable: stockstream settings, or Faust's\n"
        "own (e.g. PRODUCER_LINGER=0.05, which Faust reads from the environment)",
    )
    p.add_argument(
        "--contenders",
        default="plain-read,worker",
        type=lambda text: [parse_contender(t) for t in text.split(",") if t],
        help="comma-separated, run in this order in every round (default plain-read,worker):\n"
        f"{', '.join(KINDS)}, or a preset ({', '.join(PRESETS)});\n"
        "NAME:VAR=VALUE[:VAR=VALUE] sets environment for that one (LOOP=uvloop: Faust's loop)",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="rounds of all contenders, interleaved (1)"
    )
    p.add_argument(
        "--reference",
        default="faust-min",
        help="the contender the ratio column divides by, round by round (faust-min)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp data dir (worker log, RocksDB, profile) and the topics",
    )
    args = p.parse_args()
    if args.profiler == "auto":
        args.profiler = "py-spy" if pyspy_path() else "pyinstrument"
    elif args.profiler == "py-spy" and not pyspy_path():
        p.error("py-spy not found (pip install py-spy)")
    return args


def rate(count: float, seconds: float | None) -> str:
    if not seconds:
        return "n/a"
    return f"{count / seconds:,.0f} quotes/s ({seconds:.2f} s)"


def output_problems(out: OutputCheck, expected: int, n: int) -> list[str]:
    """What is wrong with a worker's output: every expected window once, counts adding up."""
    problems = []
    if out.records != expected or out.distinct != expected:
        problems.append(
            f"expected {expected} windows, got {out.records} records ({out.distinct} distinct)"
        )
    if out.missing:
        problems.append(f"{len(out.missing)} missing, e.g. {out.missing[:3]}")
    if out.extra:
        problems.append(f"{len(out.extra)} unexpected, e.g. {out.extra[:3]}")
    if out.duplicates:
        problems.append(f"{len(out.duplicates)} duplicated windows")
    if out.quotes_counted != n:
        problems.append(f"window counts add up to {out.quotes_counted}, not {n}")
    return problems


def report(
    args: argparse.Namespace,
    info: Preloaded,
    base: tuple[int, float] | None,
    result: WorkerResult,
    name: str = "worker",
) -> None:
    expected = len(info.windows)
    n = info.quotes
    base_read, base_s = base or (0, 0.0)
    print()
    print("=" * 72)
    print(
        f"{name}  quotes={n:,} symbols={args.symbols} "
        f"partitions={args.partitions} store={args.store}"
        + (f"  [profiled with {args.profiler}]" if args.profile else "")
        + "".join(f"  {name}={value}" for name, value in args.env)
    )
    print("=" * 72)
    print(f"code                  {code_version()}, python {sys.version.split()[0]}")
    span_s = (info.last_ms - info.first_ms) / 1000
    print(
        f"preload               {rate(n, info.seconds)}, {info.nbytes / n:.0f} B/quote, "
        f"event time spans {span_s / 60:.1f} min"
    )
    print(f"expected windows      {expected:,}")
    if base is not None:
        print(
            f"plain consumer        {rate(base_read, base_s)}  (read + orjson.loads, "
            f"{base_read:,} records)"
        )
    print(
        f"worker startup        {result.startup_s:.2f} s (spawn -> /ready/ 200), "
        f"{result.processed_at_ready:,} quotes already processed at ready"
    )
    span = result.span
    processed = span.records
    print(
        f"worker processing     {rate(processed, span.seconds)}  (first -> all quotes "
        f"counted in stockstream_quotes_total)"
    )
    print(
        f"worker end-to-end     {rate(processed, result.e2e_s)}  (first -> all windows in "
        f"the output topic, incl. {IDLE_TIMEOUT_S:.0f} s idle flush)"
    )
    if span.seconds and base_s:
        ratio = (processed / span.seconds) / (base_read / base_s)
        print(f"ratio worker/plain    {ratio:.3f}  (processing rate / plain consumer rate)")
    if span.cpu_s is not None and span.seconds:
        print(
            f"worker CPU            {span.cpu_s:.1f} s user+sys while processing"
            f" = {100 * span.cpu_s / span.seconds:.0f}% of one core,"
            f" {span.cpu_us_per_record:.0f} us/quote"
            f" ({os.cpu_count()} CPUs here, broker included)"
        )
    rss = "n/a" if result.peak_rss_mb is None else f"{result.peak_rss_mb:,.0f} MB"
    print(f"worker peak RSS       {rss} (VmHWM, with its child processes)")
    if result.metrics is not None:
        outcomes = ", ".join(f"{k}={int(v):,}" for k, v in sorted(result.metrics.quotes.items()))
        triggers = ", ".join(f"{k}={int(v):,}" for k, v in sorted(result.metrics.emitted.items()))
        print(f"quote outcomes        {outcomes}")
        print(f"windows emitted by    {triggers}")
    print(f"dead letters          {result.dlq_records:,}")
    out = result.output
    print(
        f"windows               expected {expected:,}, output topic records "
        f"{result.emitted_records:,}" + ("" if out is None else f", distinct {out.distinct:,}")
    )
    if out is not None:
        dup = "none" if not out.duplicates else f"{len(out.duplicates)} e.g. {out.duplicates[:3]}"
        print(f"duplicates            {dup}")
        print(
            f"quotes in windows     {out.quotes_counted:,} (sum of window counts; expected {n:,})"
        )
        for problem in output_problems(out, expected, n):
            print(f"!!!!!!!! WARNING: {problem} !!!!!!!!")
    print("=" * 72)


# ----------------------------------------------------------------------------- contenders

CONTENDERS_DIR = Path(__file__).resolve().parent / "contenders"
QUIX_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
# Bigger fetches (so bigger batches: fewer changelog writes per quote).
TUNED = "FAUST_CONSUMER_MAX_FETCH_SIZE=4194304"
# The archive and the warehouse loader inside the worker (local directory, DuckDB); the
# archive in its child process (the default) or in the worker's event loop (`-inline`).
FULL = "ARCHIVE_ENABLED=true:WAREHOUSE_ENABLED=true"
INLINE = "ARCHIVE_PROCESS=inline"
#: Shorthands for contender specs (`name[:NAME=VALUE]...`; LOOP=uvloop picks Faust's loop).
PRESETS = {
    "faust-min-uvloop": "faust-min:LOOP=uvloop",
    "faust-min-lean": "faust-min:BENCH_LEAN=1",
    "faust-min-lean-uvloop": "faust-min:BENCH_LEAN=1:LOOP=uvloop",
    "faust-min-batched": "faust-min:BENCH_LEAN=1:BENCH_BATCHED=1",
    "faust-min-batched-uvloop": "faust-min:BENCH_LEAN=1:BENCH_BATCHED=1:LOOP=uvloop",
    "worker-uvloop": "worker:LOOP=uvloop",
    "worker-tuned": f"worker:{TUNED}",
    "worker-tuned-uvloop": f"worker:LOOP=uvloop:{TUNED}",
    "worker-full": f"worker:{FULL}",
    "worker-full-inline": f"worker:{FULL}:{INLINE}",
    "worker-full-tuned": f"worker:{FULL}:{TUNED}",
}
KINDS = ("plain-read", "plain-agg", "faust-min", "quix", "worker")


@dataclass
class Contender:
    spec: str
    kind: str
    loop: str
    env: dict[str, str]


def parse_contender(text: str) -> Contender:
    spec = PRESETS.get(text, text)
    kind, *pairs = spec.split(":")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown contender {kind!r} (one of {KINDS})")
    env = dict(env_pair(p) for p in pairs)
    loop = env.pop("LOOP", "aio")
    return Contender(text, kind, loop, env)


@dataclass
class Outcome:
    span: Span | None
    problems: list[str] = field(default_factory=list)
    note: str = ""


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    from aiokafka.admin import NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def run_process_contender(
    c: Contender, base: Run, info: Preloaded, args: argparse.Namespace
) -> Outcome:
    """plain-agg, faust-min, quix: a process that reports its count in a progress file."""
    run = base.sibling(c.env)
    progress = run.data_dir / "progress"
    output = f"bench-out-{run.run_id}"
    env = {
        **os.environ,
        "BENCH_BOOTSTRAP": run.bootstrap,
        "BENCH_TOPIC": run.quotes_topic,
        "BENCH_OUTPUT": output,
        "BENCH_APP_ID": f"bench-{c.kind}-{run.run_id}",
        "BENCH_PARTITIONS": str(run.partitions),
        "BENCH_PROGRESS": str(progress),
        "BENCH_EXPECT": str(info.quotes),
        "BENCH_DATADIR": str(run.data_dir / "faust"),
        "BENCH_STATE_DIR": str(run.data_dir / "state"),
        "BENCH_WEB_PORT": str(run.web_port),
        **c.env,
    }
    if c.kind == "quix":
        if not QUIX_PYTHON.exists():
            return Outcome(None, note="skipped: no .venv-bench (see benchmarks/README.md)")
        cmd = [str(QUIX_PYTHON), str(CONTENDERS_DIR / "quix_aggregate.py")]
    elif c.kind == "plain-agg":
        cmd = [sys.executable, str(CONTENDERS_DIR / "plain_aggregate.py")]
    else:
        cmd = [sys.executable, "-m", "faust", "-A", "minimal_faust", "-L", c.loop, "worker"]
        cmd += ["-l", "warn"]
    if c.kind != "faust-min":
        await create_topic(run.bootstrap, output, run.partitions)
    proc = Process(cmd, env, CONTENDERS_DIR, run.data_dir / f"{c.kind}.log")

    async def counted() -> int:
        return read_progress(str(progress))

    try:
        span = await follow(counted, proc, info.quotes, deadline_s=max(600.0, info.quotes / 200))
    except WorkerGone as exc:
        log(f"{c.spec} failed: {exc}\n{proc.tail()}")
        return Outcome(None, note=str(exc))
    finally:
        proc.stop()
        await delete_run_topics(run)
    return Outcome(span)


async def run_plain_read(base: Run, info: Preloaded) -> Outcome:
    cpu = time.process_time()
    started = time.perf_counter()
    read, seconds = await baseline(base, info.quotes, timeout_s=600)
    span = Span(started, 0, read, seconds, time.process_time() - cpu, None)
    return Outcome(span, note="in the harness process")


async def run_worker(
    c: Contender,
    base: Run,
    info: Preloaded,
    args: argparse.Namespace,
    plain: tuple[int, float] | None,
    detail: bool,
    profile: bool,
) -> Outcome:
    run = base.sibling({**dict(args.env), **c.env})
    profiling = Profiling(args.profiler, run.data_dir) if profile else None
    worker = WorkerProcess(run, run.data_dir / "worker.log", profiling, c.loop)
    try:
        result = await measure_worker(run, worker, info, len(info.windows))
    except (WorkerGone, TimeoutError) as exc:
        log(f"worker failed: {exc}\n--- worker log tail:\n{worker.tail()}")
        return Outcome(None, note=f"failed: {exc}")
    finally:
        worker.stop()
        if profiling is not None:
            profiling.kill()
        if not args.keep:
            await delete_run_topics(run)
    problems = (
        []
        if result.output is None
        else output_problems(result.output, len(info.windows), info.quotes)
    )
    if detail:
        report(args, info, plain, result, name=c.spec)
    if profiling is not None:
        if result.samples is not None:
            print(f"profile of {c.spec}'s processing phase ({profiling.kind}):")
            print_summary(result.samples)
            print("=" * 72)
        else:
            print("!!!!!!!! WARNING: the profiler wrote no profile !!!!!!!!")
    errors = [ln for ln in worker.tail(2000).splitlines() if "ERROR" in ln]
    note = f"{len(errors)} ERROR log lines" if errors else ""
    if errors:
        log(f"{c.spec}: worker log has {len(errors)} ERROR lines, first: {errors[0][:300]}")
    return Outcome(result.span, problems, note)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(
    args: argparse.Namespace, info: Preloaded, results: dict[str, list[Outcome]]
) -> None:
    """Rates per round, and each contender's rate over the reference's in the same round."""
    ref = args.reference if args.reference in results else None
    print()
    print("=" * 100)
    print(
        f"aggregate throughput  quotes={info.quotes:,} symbols={args.symbols} "
        f"partitions={args.partitions} rounds={args.rounds} (interleaved)  {code_version()}"
    )
    print(f"{'contender':<44}{'records/s per round':>26}  {'x ' + (ref or '-'):<18}"
          f"{'CPU us/rec':>11}{'RSS MB':>8}")  # fmt: skip
    for name, outcomes in results.items():
        rates = [o.span.rate if o.span else None for o in outcomes]
        ratios: list[float] = []
        if ref is not None:
            for mine, theirs in zip(outcomes, results[ref], strict=True):
                if mine.span and theirs.span and mine.span.rate and theirs.span.rate:
                    ratios.append(mine.span.rate / theirs.span.rate)
        cpus = [o.span.cpu_us_per_record for o in outcomes if o.span and o.span.cpu_us_per_record]
        rss = [o.span.peak_rss_mb for o in outcomes if o.span and o.span.peak_rss_mb]
        ratio = f"{sum(ratios) / len(ratios):.2f}" if ratios else "-"
        if len(ratios) > 1:
            ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        print(
            f"{name:<44}{' '.join(fmt(r, ',.0f') for r in rates):>26}  {ratio:<18}"
            f"{fmt(sorted(cpus)[len(cpus) // 2] if cpus else None, '.0f'):>11}"
            f"{fmt(max(rss) if rss else None, '.0f'):>8}"
        )
        for o in outcomes:
            if o.note:
                print(f"    {o.note}")
            for problem in o.problems:
                print(f"!!!!!!!! WARNING: {name}: {problem} !!!!!!!!")
    print("=" * 100)


async def main_async(args: argparse.Namespace, broker: Broker, data_dir: Path) -> None:
    run = Run(broker.bootstrap, args.partitions, args.store, data_dir, dict(args.env))
    log(f"run {run.run_id}: data dir {data_dir}")
    contenders: list[Contender] = args.contenders
    results: dict[str, list[Outcome]] = {c.spec: [] for c in contenders}
    try:
        info = await preload(run, args)
        log(
            f"preloaded {info.quotes:,} quotes in {info.seconds:.1f} s into {run.quotes_topic}, "
            f"{len(info.windows):,} expected windows"
        )
        plain: tuple[int, float] | None = None
        profiled = False
        for round_no in range(args.rounds):
            for c in contenders:
                log(f"round {round_no + 1}/{args.rounds}: {c.spec}")
                if c.kind == "plain-read":
                    outcome = await run_plain_read(run, info)
                    if outcome.span and outcome.span.seconds:
                        plain = (outcome.span.records, outcome.span.seconds)
                elif c.kind == "worker":
                    profile = args.profile and not profiled
                    profiled = profiled or profile
                    outcome = await run_worker(
                        c, run, info, args, plain, detail=round_no == 0, profile=profile
                    )
                else:
                    outcome = await run_process_contender(c, run, info, args)
                results[c.spec].append(outcome)
                span = outcome.span
                speed = fmt(span.rate if span else None, ",.0f")
                log(f"{c.spec}: {speed} records/s {outcome.note}")
        print_table(args, info, results)
    finally:
        if not args.keep:
            try:
                await delete_run_topics(run)
            except Exception as exc:  # cleanup is best effort
                log(f"could not delete the run's topics: {exc!r}")


def main() -> None:
    args = parse_args()
    broker = Broker(args.bootstrap)
    data_dir = Path(tempfile.mkdtemp(prefix="stockstream-bench-"))
    try:
        broker.start()
        asyncio.run(main_async(args, broker, data_dir))
    except (WorkerGone, TimeoutError) as exc:
        raise SystemExit(f"benchmark aborted: {exc}") from None
    finally:
        if args.keep:
            log(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
        broker.stop()


if __name__ == "__main__":
    main()
