"""Quotes per second the QuoteProducer sustains into a local broker, next to plain aiokafka.

    python benchmarks/producer_throughput.py [--quotes 200000] [--symbols 50]
        [--partitions 3] [--rounds 3] [--bootstrap HOST:PORT]

Both sides send the same records: the same pre-generated, seeded simulator quotes, key =
symbol, value = `Quote.to_json()` (serialised inside the timed loop on both sides), with the
same client settings (acks=all, idempotence, PRODUCER_LINGER_MS, PRODUCER_BATCH_BYTES,
PRODUCER_COMPRESSION defaults from stockstream/settings.py). Each side gets a fresh topic per
round; a round times from the first send until `flush()` returned (every record
acknowledged), after the client is started. The plain side only sends and flushes; the
QuoteProducer also tracks each delivery (metrics, deadline, spool bookkeeping). Rounds
alternate which side goes first. Printed: per round the rate and the CPU time of this process
per quote (less sensitive than wall time to other load on the machine), then medians and
their ratio. Each run is checked: every record is in its topic (end offsets), nothing spooled.

Without --bootstrap it starts a broker with scripts/kafka.sh on port 39092 (controller
40092) and stops it again afterwards if it started it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiokafka
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stockstream.contracts.quotes import Quote
from stockstream.producer.quote_producer import QuoteProducer
from stockstream.settings import ProducerSettings, load_settings
from stockstream.sources.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
BENCH_KAFKA_PORT = 39092
BENCH_CONTROLLER_PORT = 40092
SEED = 20240607
START_MS = 1_767_623_400_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Broker:
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


@dataclass
class Result:
    side: str
    mode: str
    round: int
    seconds: float
    cpu_seconds: float
    count: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_us_per_quote(self) -> float:
        return self.cpu_seconds / self.count * 1e6


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def records_in(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return int(sum((await consumer.end_offsets(tps)).values()))
    finally:
        await consumer.stop()


def client_settings(p: ProducerSettings) -> dict[str, object]:
    return {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": p.linger_ms,
        "max_batch_size": p.batch_bytes,
        "compression_type": None if p.compression == "none" else p.compression,
        "request_timeout_ms": p.request_timeout_ms,
    }


async def run_plain(
    bootstrap: str, topic: str, quotes: list[Quote], rnd: int, raw: list[tuple[bytes, bytes]]
) -> Result:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        **client_settings(ProducerSettings()),  # type: ignore[arg-type]
    )
    await producer.start()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        if raw:
            for key, value in raw:
                await producer.send(topic, value=value, key=key)
        else:
            for q in quotes:
                await producer.send(topic, value=q.to_json(), key=q.symbol.encode())
        await producer.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await producer.stop()
    return Result("plain aiokafka", "raw" if raw else "quote", rnd, wall, cpu, len(quotes))


async def run_stockstream(
    bootstrap: str,
    topic: str,
    quotes: list[Quote],
    rnd: int,
    spool_dir: Path,
    raw: list[tuple[bytes, bytes]],
) -> Result:
    settings = load_settings(
        environ={
            "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_QUOTES_TOPIC": topic,
            "PRODUCER_SPOOL_DIR": str(spool_dir),
        },
        dotenv_path=None,
    )
    assert settings.producer == ProducerSettings(spool_dir=spool_dir)
    async with QuoteProducer(settings) as producer:
        wall, cpu = time.perf_counter(), time.process_time()
        if raw:
            for key, value in raw:
                await producer.send_raw(key, value)
        else:
            for q in quotes:
                await producer.send(q)
        await producer.flush()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if producer.sent != len(quotes) or producer.spooled or producer.failed:
            raise RuntimeError(
                f"QuoteProducer: sent {producer.sent}, spooled {producer.spooled},"
                f" failed {producer.failed} of {len(quotes)}"
            )
    return Result("QuoteProducer", "raw" if raw else "quote", rnd, wall, cpu, len(quotes))


MODES = {
    "quote": "from Quote objects: Quote.to_json() + symbol key inside the timed loop",
    "raw": "pre-serialised key/value bytes (QuoteProducer.send_raw): the producers alone",
}


async def bench(args: argparse.Namespace, bootstrap: str) -> list[Result]:
    sim = Simulator(symbols=args.symbols, seed=SEED, rate=1000.0, start_ms=START_MS)
    quotes = list(sim.quotes(args.quotes))
    serialised = [(q.symbol.encode(), q.to_json()) for q in quotes]
    payload = sum(len(k) + len(v) for k, v in serialised)
    log(
        f"{len(quotes)} quotes over {args.symbols} symbols, {payload / len(quotes):.0f} bytes"
        f" (key + value) each; {args.partitions} partitions; client settings"
        f" {client_settings(ProducerSettings())}"
    )
    run_id = uuid.uuid4().hex[:8]
    results: list[Result] = []
    topics: list[str] = []
    with tempfile.TemporaryDirectory(prefix="producer-bench-") as tmp:
        try:
            for rnd in range(1, args.rounds + 1):
                for mode in args.modes:
                    raw = serialised if mode == "raw" else []
                    order = ["plain", "stockstream"] if rnd % 2 else ["stockstream", "plain"]
                    for side in order:
                        topic = f"bench-producer-{side}-{mode}-{run_id}-{rnd}"
                        await create_topic(bootstrap, topic, args.partitions)
                        topics.append(topic)
                        if side == "plain":
                            result = await run_plain(bootstrap, topic, quotes, rnd, raw)
                        else:
                            spool = Path(tmp) / f"spool-{mode}-{rnd}"
                            result = await run_stockstream(
                                bootstrap, topic, quotes, rnd, spool, raw
                            )
                        stored = await records_in(bootstrap, topic, args.partitions)
                        if stored != len(quotes):
                            raise RuntimeError(f"{topic}: {stored} records, expected {len(quotes)}")
                        results.append(result)
                        log(
                            f"round {rnd} {mode:>5} {result.side:>15}:"
                            f" {result.rate:>9,.0f} quotes/s ({result.seconds:.2f} s,"
                            f" {result.cpu_us_per_quote:.1f} us CPU/quote)"
                        )
        finally:
            if topics:
                await delete_topics(bootstrap, topics)
    return results


def report(results: list[Result], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(
        f"producer throughput: {args.quotes} quotes x {args.rounds} rounds,"
        f" {args.partitions} partitions, {args.symbols} symbols"
    )
    print(
        f"python {platform.python_version()}, aiokafka {aiokafka.__version__},"
        f" {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for mode in args.modes:
        plain = [r for r in results if r.mode == mode and r.side == "plain aiokafka"]
        ours = [r for r in results if r.mode == mode and r.side == "QuoteProducer"]
        print(f"\n[{mode}] {MODES[mode]}")
        print(f"{'round':>5} {'plain aiokafka':>24} {'QuoteProducer':>24} {'ratio':>7}")
        for a, b in zip(plain, ours, strict=True):
            print(
                f"{a.round:>5} {a.rate:>11,.0f}/s {a.cpu_us_per_quote:>6.1f}us/q"
                f" {b.rate:>11,.0f}/s {b.cpu_us_per_quote:>6.1f}us/q {b.rate / a.rate:>7.2f}"
            )
        plain_rate = statistics.median(r.rate for r in plain)
        ours_rate = statistics.median(r.rate for r in ours)
        plain_cpu = statistics.median(r.cpu_us_per_quote for r in plain)
        ours_cpu = statistics.median(r.cpu_us_per_quote for r in ours)
        print(f"median plain aiokafka: {plain_rate:>9,.0f} quotes/s, {plain_cpu:.1f} us CPU/quote")
        print(f"median QuoteProducer:  {ours_rate:>9,.0f} quotes/s, {ours_cpu:.1f} us CPU/quote")
        print(
            f"ratio QuoteProducer/plain: {ours_rate / plain_rate:.2f} (throughput),"
            f" {ours_cpu / plain_cpu:.2f} (CPU per quote)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quotes", type=int, default=200_000)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=sorted(MODES),
        default=["quote", "raw"],
        help="quote: serialise Quote objects in the loop; raw: pre-serialised bytes",
    )
    parser.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    args = parser.parse_args()
    broker = Broker(args.bootstrap)
    broker.start()
    try:
        results = asyncio.run(bench(args, broker.bootstrap))
    finally:
        broker.stop()
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
