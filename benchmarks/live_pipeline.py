"""The worker under a live feed: close latency, web-view latency, memory; and scale-out.

    python benchmarks/live_pipeline.py latency [--rate 2000] [--symbols 500] [--duration 180]
    python benchmarks/live_pipeline.py latency --duration 1800        # the 30-minute memory run
    python benchmarks/live_pipeline.py scale [--quotes 60000] [--partitions 6] [--rate 1000]
    python benchmarks/live_pipeline.py scale --rebalance-only [--warmup-seconds 45]

`latency`: one worker on fresh topics; this script produces simulated quotes paced so their
event time is the wall clock (`--rate` quotes/s over `--symbols` symbols) and measures
- close latency: from the moment a window can close -- the broker acknowledged the quote that
  took its partition's watermark (AGG_WATERMARK_QUORUM-th highest symbol progress, as
  tables/windows.py computes it) past window end + grace -- to the window's record being read
  from the aggregated topic (a consumer with a 10 ms fetch wait), p50/p99/max;
- web-view latency: about once a second a quote just sent is looked up on the worker's
  `/api/symbol/?symbol=` page until an open window shows its offset, p50/p99/max;
- memory: the worker's RSS every 5 s; after warm-up (the first fifth, at least 60 s) its
  first, min, max and last value and the spread around the first;
- state per open window: changelog bytes (key + JSON value) of the worker's open windows
  (`/windows/`), and Python heap bytes per window measured here with tracemalloc.

`scale`: a backlog of `--quotes` on a `--partitions` topic read by one worker, then by two in
one consumer group (rates and ratio, output checked for missing and duplicated windows); then,
under a live feed, a second worker joins and later leaves, each shortly before windows become
closable: the longest time no quote was processed by any worker, the longest time each
partition's watermark did not move (the rebalance pause of the partitions that moved), the
close latency of the windows around it, and the output checked for duplicates and per-symbol
order. `--rebalance-only` measures only that part.

Figures only, no pass/fail. Uses the broker of aggregate_throughput.py (scripts/kafka.sh on
29092 unless --bootstrap) and its helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aggregate_throughput import (
    QUOTES_METRIC,
    Broker,
    Preloaded,
    Run,
    WorkerProcess,
    code_version,
    delete_run_topics,
    env_pair,
    follow,
    http_get,
    log,
    output_problems,
    preload,
    read_output,
    scrape,
    status_mb,
    wait_ready,
)
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from stockstream.kafka.topics import ensure_topics
from stockstream.sources.simulator import Simulator
from stockstream.tables.state_codec import encode_window
from stockstream.tables.window_state import window_key
from stockstream.tables.windows import PartitionWindows, WindowAggregate

SEED = 20240611
RSS_EVERY_S = 5.0
WATERMARK_METRIC = re.compile(rb'^stockstream_watermark_seconds\{partition="(\d+)"\} (\S+)$', re.M)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{1000 * value:,.0f} ms"


# ----------------------------------------------------------------------------- live feed


@dataclass
class Feed:
    """Paced simulated quotes, and when each window could close (per source partition)."""

    run: Run
    rate: float
    symbols: int
    size_ms: int
    grace_ms: int
    quorum: int
    sent: int = 0
    # (partition, window end ms) -> wall time the quote that made it closable was acked.
    closable_at: dict[tuple[int, int], float] = field(default_factory=dict)
    # Quotes sent recently, for the web-view probe: (symbol, partition, offset, sent at).
    probes: asyncio.Queue[tuple[str, int, int, float]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=1)
    )
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def produce(self) -> None:
        now_ms = int(time.time() * 1000)
        sim = Simulator(symbols=self.symbols, seed=SEED, rate=self.rate, start_ms=now_ms)
        producer = AIOKafkaProducer(bootstrap_servers=self.run.bootstrap, acks=1, linger_ms=5)
        await producer.start()
        partitioner = DefaultPartitioner()
        parts = list(range(self.run.partitions))
        # The worker's watermark, recomputed here from what is sent (tables/windows.py).
        clocks = {
            p: PartitionWindows(self.size_ms, self.grace_ms, quorum=self.quorum) for p in parts
        }
        next_end: dict[int, int] = {}
        t0 = time.monotonic()
        last_probe = 0.0
        try:
            for quote in sim.quotes():
                if self.stop.is_set():
                    break
                ahead = (quote.market_timestamp - now_ms) / 1000 - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                key = quote.symbol.encode()
                partition = partitioner(key, parts, parts)
                clock = clocks[partition]
                before = clock.clock.watermark_ms
                clock.apply(quote, self.sent)
                mark = clock.clock.watermark_ms
                due: list[int] = []
                if mark > before and mark >= 0:
                    end = next_end.get(partition)
                    if end is None:
                        end = next_end[partition] = clock.window_start(mark) + self.size_ms
                    while end + self.grace_ms <= mark:
                        due.append(end)
                        end += self.size_ms
                    next_end[partition] = end
                    clock.open.clear()  # only the clock matters here
                fut = await producer.send(
                    self.run.quotes_topic, key=key, value=quote.to_json(), partition=partition
                )
                sent_at = time.monotonic()
                self.sent += 1
                probe = sent_at - last_probe >= 1.0 and self.probes.empty()
                if probe:
                    last_probe = sent_at
                if due or probe:
                    fut.add_done_callback(
                        lambda f, p=partition, d=due, s=quote.symbol, pr=probe, at=sent_at: (
                            self._acked(f, p, d, s, pr, at)
                        )
                    )
        finally:
            await producer.stop()

    def _acked(
        self, fut: Any, partition: int, due: list[int], symbol: str, probe: bool, sent_at: float
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        acked = time.monotonic()
        for end in due:
            self.closable_at.setdefault((partition, end), acked)
        if probe and self.probes.empty():
            self.probes.put_nowait((symbol, partition, fut.result().offset, sent_at))


@dataclass
class Emitted:
    partition: int
    offset: int
    symbol: str
    start_ms: int
    read_at: float


async def read_windows(run: Run, into: list[Emitted], stop: asyncio.Event) -> None:
    """Every window record as soon as it is readable (10 ms fetch wait)."""
    consumer = AIOKafkaConsumer(
        run.aggregated_topic,
        bootstrap_servers=run.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            at = time.monotonic()
            for tp, records in batches.items():
                for r in records:
                    data = orjson.loads(r.value)
                    into.append(
                        Emitted(
                            tp.partition,
                            r.offset,
                            data["symbol"],
                            int(data["window_start_ms"]),
                            at,
                        )
                    )
    finally:
        await consumer.stop()


async def probe_web(
    feed: Feed, ports: list[int], samples: list[float], stop: asyncio.Event
) -> None:
    """Quote sent -> an open window of its symbol on the web view holds its offset."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            try:
                symbol, _partition, offset, sent_at = await asyncio.wait_for(
                    feed.probes.get(), timeout=1.0
                )
            except TimeoutError:
                continue
            deadline = sent_at + 30
            while time.monotonic() < deadline and not stop.is_set():
                try:
                    # Any worker answers: the page forwards to the partition's owner.
                    status, body = await http_get(
                        session, ports[0], f"/api/symbol/?symbol={symbol}"
                    )
                except (TimeoutError, aiohttp.ClientError, OSError):
                    status, body = 0, b""
                if status == 200:
                    view = orjson.loads(body)
                    if any(w.get("last_offset", -1) >= offset for w in view.get("open", [])):
                        samples.append(time.monotonic() - sent_at)
                        break
                await asyncio.sleep(0.01)


def close_latencies(
    feed: Feed, emitted: list[Emitted], since: float = 0.0, until: float = float("inf")
) -> tuple[list[float], int]:
    """(latencies of the windows read in [since, until) whose closable moment is known,
    how many were read before that moment)."""
    out: list[float] = []
    early = 0
    for e in emitted:
        if not since <= e.read_at < until:
            continue
        at = feed.closable_at.get((e.partition, e.start_ms + feed.size_ms))
        if at is None:
            continue
        if e.read_at < at:
            early += 1
        out.append(max(0.0, e.read_at - at))
    return out, early


def order_problems(emitted: list[Emitted]) -> list[str]:
    """Duplicated windows, and a symbol's windows out of start order in its partition."""
    problems: list[str] = []
    seen: dict[tuple[str, int], int] = {}
    last_start: dict[str, int] = {}
    for e in sorted(emitted, key=lambda e: (e.partition, e.offset)):
        key = (e.symbol, e.start_ms)
        if key in seen:
            problems.append(f"duplicate window {key}")
        seen[key] = e.offset
        if e.start_ms < last_start.get(e.symbol, -1):
            problems.append(f"{e.symbol}: window {e.start_ms} after a later one")
        last_start[e.symbol] = max(e.start_ms, last_start.get(e.symbol, -1))
    return problems


def heap_bytes_per_window(n: int = 20_000) -> float:
    """Python heap per open window as PartitionWindows keeps it (object + dict entry)."""
    windows: dict[tuple[str, int], WindowAggregate] = {}
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        symbol = f"SYM{i % 500:03d}"
        windows[(symbol, i * 60_000)] = WindowAggregate(
            symbol, i * 60_000, 60_000, 12, 1234.5, 99.5, 101.25, 100.0, i, 100.5, i + 1,
            1500.0, 150_000.0, i, i + 1, 10_000 + i,
        )  # fmt: skip
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


# ----------------------------------------------------------------------------- latency


async def latency_mode(args: argparse.Namespace, broker: Broker, data_dir: Path) -> None:
    run = Run(broker.bootstrap, args.partitions, args.store, data_dir, dict(args.env))
    settings = run.settings()
    agg = settings.aggregation
    await ensure_topics(settings)
    feed = Feed(
        run,
        args.rate,
        args.symbols,
        agg.window_seconds * 1000,
        int(agg.grace_seconds * 1000),
        agg.watermark_quorum,
    )
    worker = WorkerProcess(run, data_dir / "worker.log", None, args.loop)
    emitted: list[Emitted] = []
    web: list[float] = []
    rss: list[tuple[float, float]] = []
    stop = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, worker, limit_s=180)
            log(f"worker ready; feeding {args.rate:,.0f} quotes/s for {args.duration:.0f} s")
            cpu0, t0 = worker.cpu_seconds(), time.monotonic()
            tasks = [
                asyncio.create_task(feed.produce()),
                asyncio.create_task(read_windows(run, emitted, stop)),
                asyncio.create_task(probe_web(feed, [run.web_port], web, stop)),
            ]
            next_report = t0 + 60
            while time.monotonic() - t0 < args.duration:
                if not worker.alive():
                    raise RuntimeError(f"worker exited: {worker.tail()}")
                value = status_mb(worker.pids(), "VmRSS")
                if value is not None:
                    rss.append((time.monotonic() - t0, value))
                if time.monotonic() >= next_report:
                    next_report += 60
                    lat, _ = close_latencies(feed, emitted)
                    log(
                        f"  {time.monotonic() - t0:.0f} s: {feed.sent:,} quotes sent, "
                        f"{len(emitted):,} windows read, close p99 {ms(pct(lat, 0.99))}, "
                        f"RSS {value:.0f} MB"
                    )
                await asyncio.sleep(RSS_EVERY_S)
            cpu = worker.cpu_seconds()
            elapsed = time.monotonic() - t0
            feed.stop.set()
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            status, body = await http_get(session, run.web_port, "/windows/")
            state = orjson.loads(body) if status == 200 else {}
            metrics = await scrape(session, worker)
    finally:
        worker.stop()
        if not args.keep:
            await delete_run_topics(run)
    open_windows = [w for p in state.values() for w in p.get("open", [])]
    restored = [_as_window(w, feed.size_ms) for w in open_windows]
    changelog_bytes = [
        len(orjson.dumps(window_key(0, w))) + len(orjson.dumps(encode_window(w))) for w in restored
    ]
    lat, early = close_latencies(feed, emitted)
    print()
    print("=" * 88)
    print(
        f"live latency  rate={args.rate:,.0f}/s symbols={args.symbols} partitions="
        f"{args.partitions} duration={args.duration:.0f} s loop={args.loop}  {code_version()}"
        + "".join(f"  {k}={v}" for k, v in args.env)
    )
    print("=" * 88)
    outcomes = ", ".join(f"{k}={int(v)}" for k, v in metrics.quotes.items())
    print(
        f"quotes sent           {feed.sent:,} ({feed.sent / elapsed:,.0f}/s), processed "
        f"{metrics.quotes_total:,} ({outcomes})"
    )
    if cpu is not None and cpu0 is not None:
        print(f"worker CPU            {100 * (cpu - cpu0) / elapsed:.0f}% of one core")
    print(
        f"close latency         p50 {ms(pct(lat, 0.5))}  p99 {ms(pct(lat, 0.99))}  "
        f"max {ms(max(lat) if lat else None)}  ({len(lat):,} windows; closable -> readable"
        f" in the aggregated topic)"
    )
    if early:
        print(f"    {early} windows were readable before the harness saw them closable")
    print(
        f"web-view latency      p50 {ms(pct(web, 0.5))}  p99 {ms(pct(web, 0.99))}  "
        f"max {ms(max(web) if web else None)}  ({len(web)} probes; quote sent -> its offset"
        f" in an open window of /api/symbol/)"
    )
    warm = max(60.0, args.duration / 5)
    steady = [v for t, v in rss if t >= warm]
    if steady:
        first = steady[0]
        spread = max(abs(max(steady) - first), abs(min(steady) - first)) / first
        print(
            f"RSS after {warm:.0f} s warm-up first {first:.0f} MB, min {min(steady):.0f}, max "
            f"{max(steady):.0f}, last {steady[-1]:.0f} MB: within +-{100 * spread:.1f}% of the"
            f" first ({len(steady)} samples)"
        )
    else:
        print(f"RSS                   run shorter than the {warm:.0f} s warm-up: no figure")
    if changelog_bytes:
        print(
            f"state per open window {statistics.mean(changelog_bytes):.0f} B in the changelog "
            f"(key + JSON value, {len(open_windows)} open at the end), "
            f"{heap_bytes_per_window():.0f} B of Python heap"
        )
    problems = order_problems(emitted)
    print(f"output order          {'ok' if not problems else problems[:5]}")
    for problem in problems[:5]:
        print(f"!!!!!!!! WARNING: {problem} !!!!!!!!")
    print("=" * 88)


def _as_window(record: dict[str, Any], size_ms: int) -> WindowAggregate:
    """An open window of the `/windows/` page back as a WindowAggregate (for its size)."""
    volume = record.get("volume")
    return WindowAggregate(
        symbol=record["symbol"],
        start_ms=int(record["window_start_ms"]),
        size_ms=size_ms,
        count=int(record["count"]),
        sum=float(record["sum"]),
        min=float(record["min"]),
        max=float(record["max"]),
        open=float(record["open"]),
        open_ts=int(record["first_event_ms"]),
        close=float(record["close"]),
        close_ts=int(record["last_event_ms"]),
        volume=volume,
        price_volume=(record.get("vwap") or 0.0) * (volume or 0.0),
        first_event_ms=int(record["first_event_ms"]),
        last_event_ms=int(record["last_event_ms"]),
        last_offset=int(record["last_offset"]),
    )


# ----------------------------------------------------------------------------- scale


async def backlog_rate(
    run: Run, info: Preloaded, workers: int, loop: str
) -> tuple[float | None, list[str]]:
    """Quotes/s of `workers` workers in one group through the preloaded backlog."""
    procs: list[WorkerProcess] = []
    try:
        for i in range(workers):
            if i:
                run = _same_group(run)
            procs.append(WorkerProcess(run, run.data_dir / f"worker{i}.log", None, loop))
        async with aiohttp.ClientSession() as session:
            for proc in procs:
                await wait_ready(session, proc, limit_s=180)

            async def counted() -> int:
                return sum([(await scrape(session, p)).quotes_total for p in procs])

            span = await follow(counted, procs[0], info.quotes, deadline_s=900)
            # Every window in the output (the last ones by the idle flush), then checked.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                out = await read_output(run, info.windows)
                if out.records >= len(info.windows):
                    break
                await asyncio.sleep(2)
            await asyncio.sleep(5)
    finally:
        for proc in procs:
            proc.stop()
    out = await read_output(run, info.windows)
    return span.rate, output_problems(out, len(info.windows), info.quotes)


def closable_soon(after: float, feed: Feed, lead: float) -> float:
    """The first monotonic time at or after `after` that is `lead` seconds before the feed's
    windows become closable (event time = wall clock: a window end plus grace)."""
    wall = time.time() + max(0.0, after - time.monotonic())
    size, grace = feed.size_ms / 1000, feed.grace_ms / 1000
    target = (wall - grace + lead) // size * size + grace - lead
    while target < wall:
        target += size
    return after + (target - wall)


def longest_stall(samples: Sequence[tuple[float, float]], since: float, until: float) -> float:
    """The longest time in [since, until) over which a sampled progress figure (a counter, a
    watermark) did not grow, from `since` to the first growth, between growths, or to the end."""
    window = [(t, n) for t, n in samples if since <= t < until]
    if not window:
        return 0.0
    longest, last_t = 0.0, since
    last_n = max((n for t, n in samples if t < since), default=window[0][1])
    for t, n in window:
        if n > last_n:
            longest = max(longest, t - last_t)
            last_t, last_n = t, n
    return max(longest, window[-1][0] - last_t)


def still_stalled(samples: Sequence[tuple[float, float]], since: float, until: float) -> bool:
    """Whether the figure did not grow from the start of its longest stall to `until`."""
    window = [(t, n) for t, n in samples if since <= t < until]
    if not window:
        return False
    longest = longest_stall(samples, since, until)
    last_growth = max(
        (t for (t, n), (_, before) in zip(window[1:], window, strict=False) if n > before),
        default=since,
    )
    return window[-1][0] - last_growth >= longest > 0


def _same_group(run: Run) -> Run:
    """The same app (consumer group, topics, changelog) for another worker process: its own
    web port and data dir."""
    other = Run(run.bootstrap, run.partitions, run.store, run.data_dir, dict(run.extra_env))
    other.run_id = run.run_id
    other.shared_quotes = run.shared_quotes
    other.data_dir = run.data_dir / f"second-{other.web_port}"
    other.data_dir.mkdir(parents=True, exist_ok=True)
    return other


async def rebalance(args: argparse.Namespace, base: Run) -> None:
    """A second worker joins and leaves while quotes arrive live."""
    run = base.sibling(dict(base.extra_env))
    settings = run.settings()
    await ensure_topics(settings)
    agg = settings.aggregation
    feed = Feed(
        run, args.rate, args.symbols, agg.window_seconds * 1000,
        int(agg.grace_seconds * 1000), agg.watermark_quorum,
    )  # fmt: skip
    first = WorkerProcess(run, run.data_dir / "a.log", None, args.loop)
    second_run = _same_group(run)
    second: WorkerProcess | None = None
    emitted: list[Emitted] = []
    progress: list[tuple[float, int]] = []
    # partition -> (time, highest watermark any worker reports) samples.
    watermarks: dict[int, list[tuple[float, float]]] = {}
    stop = asyncio.Event()
    marks: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, first, limit_s=180)
            tasks = [
                asyncio.create_task(feed.produce()),
                asyncio.create_task(read_windows(run, emitted, stop)),
            ]
            t0 = time.monotonic()
            phase = args.phase_seconds

            seen: dict[int, int] = {}
            done = 0

            async def sample(until: float) -> None:
                # Progress = the sum of each process's increments: a counter restarts with its
                # process, and one that leaves takes its count with it. Per partition: the
                # highest watermark any worker reports (a moved partition's old owner keeps
                # its last value, which the new owner's passes once it processes again).
                nonlocal done
                while time.monotonic() < until:
                    marks_now: dict[int, float] = {}
                    for proc in (first, second):
                        if proc is None or not proc.alive():
                            continue
                        with contextlib.suppress(
                            TimeoutError, aiohttp.ClientError, OSError, RuntimeError
                        ):
                            status, body = await http_get(session, proc.port, "/metrics/")
                            if status != 200:
                                continue
                            count = int(sum(float(m[2]) for m in QUOTES_METRIC.finditer(body)))
                            done += max(0, count - seen.get(proc.proc.pid, 0))
                            seen[proc.proc.pid] = count
                            for m in WATERMARK_METRIC.finditer(body):
                                part = int(m[1])
                                marks_now[part] = max(marks_now.get(part, 0.0), float(m[2]))
                    now = time.monotonic()
                    progress.append((now, done))
                    for part, value in marks_now.items():
                        watermarks.setdefault(part, []).append((now, value))
                    await asyncio.sleep(0.25)

            # Each event shortly before windows become closable: a pause then shows in their
            # close latency (a pause between two closes delays none).
            warmup = args.warmup_seconds if args.warmup_seconds is not None else phase
            await sample(closable_soon(t0 + warmup, feed, args.join_lead_seconds))
            log("second worker joins")
            marks["join"] = time.monotonic()
            second = WorkerProcess(second_run, second_run.data_dir / "b.log", None, args.loop)
            await sample(closable_soon(marks["join"] + phase, feed, args.leave_lead_seconds))
            log("second worker leaves (SIGTERM)")
            marks["leave"] = time.monotonic()
            second.proc.send_signal(signal.SIGTERM)
            await sample(marks["leave"] + phase)
            feed.stop.set()
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        first.stop()
        if second is not None:
            second.stop()
        if not args.keep:
            await delete_run_topics(run)
    print(f"rebalance under {args.rate:,.0f} quotes/s, {args.partitions} partitions:")
    for event, at in marks.items():
        until = at + args.phase_seconds
        longest = longest_stall(progress, at, until)
        # Per partition: the rebalance pause of a partition that moved is hidden in the total
        # while the partitions that stayed keep it moving.
        stalls = {p: longest_stall(s, at, until) for p, s in sorted(watermarks.items())}
        lat, _ = close_latencies(feed, emitted, at, until)
        print(
            f"  {event:<6} no quote processed for up to {longest:.1f} s; windows closed in the"
            f" next {args.phase_seconds:.0f} s: {len(lat)}, close latency p50 "
            f"{ms(pct(lat, 0.5))} p90 {ms(pct(lat, 0.9))} max {ms(max(lat) if lat else None)}"
        )
        # The windows that became closable in the phase, however late they were read: a
        # pause longer than the phase leaves some of them out of the line above.
        due = [
            max(0.0, e.read_at - at_)
            for e in emitted
            if (at_ := feed.closable_at.get((e.partition, e.start_ms + feed.size_ms))) is not None
            and at <= at_ < until
        ]
        print(
            f"         windows closable in those {args.phase_seconds:.0f} s: {len(due)}, close"
            f" latency p50 {ms(pct(due, 0.5))} max {ms(max(due) if due else None)}"
        )
        if stalls:
            # A partition still stalled when the phase ends: its pause is longer than shown.
            open_ = {p for p, samples in watermarks.items() if still_stalled(samples, at, until)}
            shown = {p: (">=" if p in open_ else "") + f"{v:.1f}" for p, v in stalls.items()}
            print(
                f"         longest watermark stall per partition: max "
                f"{'>=' if open_ else ''}{max(stalls.values()):.1f} s ("
                + ", ".join(f"p{p} {v}" for p, v in shown.items())
                + ")"
            )
    problems = order_problems(emitted)
    verdict = "ok" if not problems else problems[:5]
    print(f"  output: {len(emitted):,} windows, order and duplicates {verdict}")
    for problem in problems[:5]:
        print(f"!!!!!!!! WARNING: {problem} !!!!!!!!")


async def scale_mode(args: argparse.Namespace, broker: Broker, data_dir: Path) -> None:
    base = Run(broker.bootstrap, args.partitions, args.store, data_dir, dict(args.env))
    try:
        if args.rebalance_only:
            await ensure_topics(base.settings())
            print()
            print("=" * 88)
            print(
                f"rebalance only  symbols={args.symbols} partitions={args.partitions} "
                f"loop={args.loop}  {code_version()}" + "".join(f"  {k}={v}" for k, v in args.env)
            )
            print("=" * 88)
            await rebalance(args, base)
            print("=" * 88)
            return
        info = await preload(base, args)
        log(f"preloaded {info.quotes:,} quotes on {args.partitions} partitions")
        one, one_problems = await backlog_rate(base.sibling({}), info, 1, args.loop)
        two, two_problems = await backlog_rate(base.sibling({}), info, 2, args.loop)
        print()
        print("=" * 88)
        print(
            f"scale-out  quotes={info.quotes:,} symbols={args.symbols} partitions="
            f"{args.partitions} loop={args.loop}  ({os.cpu_count()} CPUs, broker included)"
            f"  {code_version()}"
        )
        print("=" * 88)
        print(f"one worker            {one or 0:,.0f} quotes/s")
        print(f"two workers, 1 group  {two or 0:,.0f} quotes/s")
        if one and two:
            print(f"ratio                 {two / one:.2f}")
        for name, problems in (("one", one_problems), ("two", two_problems)):
            for problem in problems:
                print(f"!!!!!!!! WARNING: {name} worker(s): {problem} !!!!!!!!")
        await rebalance(args, base)
        print("=" * 88)
    finally:
        if not args.keep:
            await delete_run_topics(base)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["latency", "scale"])
    p.add_argument("--rate", type=float, default=2000.0, help="live quotes/s (2000)")
    p.add_argument("--symbols", type=int, default=500, help="distinct symbols (500)")
    p.add_argument("--partitions", type=int, default=None, help="3 (latency), 6 (scale)")
    p.add_argument("--duration", type=float, default=180.0, help="latency run, s (180)")
    p.add_argument("--quotes", type=int, default=60_000, help="scale: backlog quotes (60000)")
    p.add_argument("--span-minutes", type=float, default=10.0, help="scale: backlog span")
    p.add_argument(
        "--phase-seconds", type=float, default=45.0, help="scale: before/after join/leave (45)"
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="scale: live feed before the second worker joins (--phase-seconds); the changelog"
        " a joining worker replays grows with it",
    )
    p.add_argument(
        "--join-lead-seconds",
        type=float,
        default=5.0,
        help="scale: start the joining worker this long before windows become closable (5;"
        " its start-up takes about 3 s before the group rebalances)",
    )
    p.add_argument(
        "--leave-lead-seconds",
        type=float,
        default=1.0,
        help="scale: stop it this long before windows become closable (1)",
    )
    p.add_argument(
        "--rebalance-only",
        action="store_true",
        help="scale: only the join/leave under the live feed (no backlog rates)",
    )
    p.add_argument("--loop", choices=["aio", "uvloop"], default="aio")
    p.add_argument("--store", default="rocksdb://", choices=["rocksdb://", "memory://"])
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--env", action="append", default=[], type=env_pair, metavar="NAME=VALUE")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    if args.partitions is None:
        args.partitions = 6 if args.mode == "scale" else 3
    return args


def main() -> None:
    args = parse_args()
    broker = Broker(args.bootstrap)
    data_dir = Path(tempfile.mkdtemp(prefix="stockstream-live-"))
    try:
        broker.start()
        mode = latency_mode if args.mode == "latency" else scale_mode
        asyncio.run(mode(args, broker, data_dir))
    finally:
        if args.keep:
            log(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
        broker.stop()


if __name__ == "__main__":
    main()
