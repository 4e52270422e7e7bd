"""Fault injection against the real services, one test per fault, each printing one line of
figures (`FAULT <name>: records_in=..., windows_expected=..., windows_out=..., missing=...,
duplicated=..., dead_letters=... (dlq duplicates=...)`; run pytest with -s to see them, they are
also in every failure message). Target everywhere: 0 missing, 0 duplicated windows, every
window equal to the independent recomputation (tests/reference.py) over what reached the quotes
topic, every invalid and late record dead-lettered (the DLQ is at-least-once by design: its
duplicates are reported, not failed on).

- broker-sigkill: the broker SIGKILLed and restarted under a producer (`stockstream produce
  --source replay`, its own process) and a worker; also every quote the source emitted is in
  the quotes topic exactly once.
- broker-sigstop: the broker frozen past the worker's session timeout while it works a backlog.
- object-store-down / warehouse-down: the S3 server (SeaweedFS) resp. the BigQuery emulator
  stopped for a minute and started again; every valid record archived once, every window
  loaded once, and the aggregation finished during the outage.
- worker-sigkill-x10: the worker SIGKILLed ten times during a long replay of a backlog.
- rebalance-kill: two workers in one group on six partitions, one killed mid-rebalance.

The broker faults use a broker of their own (faults.OwnBroker: own port pair and KAFKA_DIR);
the shared session broker is never signalled.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.integration.conftest import BigQueryEmulator
from tests.integration.faults import OwnBroker, ReplayProducer, figures, report
from tests.integration.harness import (
    Produced,
    Stack,
    Worker,
    create_topics,
    dataset,
    end_offsets,
    produce,
    read_all,
)
from tests.integration.test_aggregation import _dedupe_dlq as dedupe_dlq
from tests.integration.test_aggregation import check_output
from tests.integration.test_archive import (
    archive_env,
    merge,
    metrics,
    read_archive,
)
from tests.integration.test_warehouse import bq_rows, bq_stack, check_rows
from tests.reference import Record, expected_windows
from tests.s3_server import SeaweedS3

pytestmark = pytest.mark.integration

# Broker log: a group member whose session expired; worker log: partitions (re)assigned.
EVICTED = "has failed, removing it from the group"
REJOINED = "Executing _on_partitions_assigned"
OUTAGE = 60.0  # "down for a minute"


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path_factory.mktemp("own-kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# -- helpers ----------------------------------------------------------------------------------


async def windows_out(stack: Stack) -> int:
    return await end_offsets(stack.bootstrap, stack.aggregated, stack.partitions)


async def wait_until(
    check: Callable[[], Any], within: float, what: str, *workers: Worker, every: float = 0.25
) -> None:
    """Poll `check` (sync or async) until true; fails with the workers' log tails."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        for worker in workers:
            assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
        if time.monotonic() > deadline:
            tails = "\n".join(w.tail() for w in workers)
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}\n{tails}")
        await asyncio.sleep(every)


async def wait_windows(stack: Stack, at_least: int, within: float, *workers: Worker) -> int:
    count = 0

    async def enough() -> bool:
        nonlocal count
        count = await windows_out(stack)
        return count >= at_least

    await wait_until(enough, within, f"{at_least} windows in {stack.aggregated}", *workers)
    return count


async def collect(
    stack: Stack, produced: Produced, *workers: Worker, within: float = 180.0
) -> tuple[list[Any], list[Any]]:
    """Every window and dead letter, once the expected number of windows is out (a window
    that is still missing then shows as missing; 5 s more to let duplicates show)."""
    expected, late = expected_windows(produced.records)
    try:
        await wait_windows(stack, len(expected), within, *workers)
    except AssertionError as exc:
        print(f"collect: {str(exc).splitlines()[0]}", flush=True)
    await asyncio.sleep(5)
    windows = await read_all(
        stack.bootstrap, stack.aggregated, until=await windows_out(stack), wait_s=30, settle=1
    )
    dlq = await read_all(
        stack.bootstrap, stack.dlq, until=len(late) + len(produced.invalid), wait_s=30, settle=2
    )
    return windows, dlq


def to_records(rows: list[Any]) -> Produced:
    """The quotes topic as read back (`read_all`) -> what the reference needs."""
    records = [
        Record(p, o, v["symbol"], v["current_price"], v["market_timestamp"], v["volume"])
        for p, o, _, v, _ in rows
    ]
    return Produced(sorted(records, key=lambda r: (r.partition, r.offset)), [])


# -- the broker -------------------------------------------------------------------------------


def _quote_identity(value: dict[str, Any]) -> tuple[Any, ...]:
    return (value["symbol"], value["current_price"], value["market_timestamp"], value["volume"])


async def test_broker_sigkilled_and_restarted_under_producer_and_worker(
    own_broker: OwnBroker, tmp_path: Path
) -> None:
    """The replay producer (its own process, short delivery timeout so it spools) and the
    worker run; once windows flow the broker is SIGKILLed and restarted at once (its log
    recovery takes ~15-25 s). The replay (~50 s) outlasts the outage. The replay source
    refuses invalid rows itself, so the file holds valid quotes only and the dead letters
    here are the late ones."""
    started = time.monotonic()
    broker = own_broker
    broker.start()
    stack = Stack(broker.bootstrap, tmp_path / "data")
    await create_topics(stack)
    rows = [value for _, value, valid in dataset(symbols=24, minutes=30, seed=21) if valid]
    source = tmp_path / "quotes.ndjson"
    source.write_bytes(b"\n".join(rows) + b"\n")
    emitted = Counter(_quote_identity(json.loads(v)) for v in rows)
    worker = Worker(stack, tmp_path / "worker.log")
    producer: ReplayProducer | None = None
    try:
        worker.wait_ready()
        producer = ReplayProducer(stack.env(free_port()), source, 36, tmp_path)  # ~50 s
        await wait_windows(stack, 30, 60, worker)
        broker.sigkill()
        killed_at = time.monotonic()
        await broker.astart()
        outage = time.monotonic() - killed_at
        assert producer.proc.poll() is None, "the replay must outlast the outage"
        returncode = await asyncio.to_thread(producer.wait, 180)
        done = producer.done()
        assert returncode == 0, producer.tail()
        quotes = await end_offsets(broker.bootstrap, stack.quotes, stack.partitions)
        in_topic = await read_all(broker.bootstrap, stack.quotes, until=quotes, settle=2)
        produced = to_records(in_topic)
        windows, dlq = await collect(stack, produced, worker)
        assert worker.proc.poll() is None, f"the worker died:\n{worker.tail()}"
    finally:
        if producer is not None:
            producer.kill()
        worker.stop()
    found = Counter(_quote_identity(v) for _, _, _, v, _ in in_topic)
    fig = figures(
        "broker-sigkill",
        started,
        len(rows),
        windows,
        dlq,
        produced,
        stack,
        quotes_in_topic=len(in_topic),
        quotes_missing=sum((emitted - found).values()),
        quotes_duplicated=sum((found - emitted).values()),
        producer_sent=done.get("sent"),
        producer_spooled=done.get("spooled"),
        outage=f"{outage:.0f}s",
    )
    report(fig, worker, zero=("quotes_missing", "quotes_duplicated"))
    assert done.get("spooled", 0) > 0 and done.get("spool_pending") == 0, done
    check_output(windows, dedupe_dlq(dlq), produced, stack)


async def test_broker_frozen_past_the_session_timeout_under_a_backlog(
    own_broker: OwnBroker, tmp_path: Path
) -> None:
    """SIGSTOP while the worker works a backlog, then SIGCONT. 50 s, not just past the 8 s
    session timeout: after a 20 s freeze no session expired (the heartbeats queued in the
    broker's sockets reached the coordinator before its session timers fired on SIGCONT), so
    that was only a pause. Past the clients' 40 s request timeout they give up their
    connections, and the broker expires the members on SIGCONT (and fences itself: its own
    KRaft session timed out too); the worker has to rejoin its groups."""
    started = time.monotonic()
    broker = own_broker
    broker.start()
    stack = Stack(broker.bootstrap, tmp_path / "data")
    await create_topics(stack)
    rows = dataset(symbols=30, minutes=60, seed=23)
    produced = await produce(broker.bootstrap, stack.quotes, rows)
    expected, _ = expected_windows(produced.records)
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await wait_windows(stack, len(expected) // 5, 120, worker)
        evicted_before = broker.log_count(EVICTED)
        frozen_for = 50.0
        with broker.frozen():
            await asyncio.sleep(frozen_for)
        at_thaw = await windows_out(stack)
        rejoined_before = worker.log_path.read_text().count(REJOINED)
        assert at_thaw < len(expected), "the freeze must happen mid-backlog"
        windows, dlq = await collect(stack, produced, worker)
        assert worker.proc.poll() is None, f"the worker died:\n{worker.tail()}"
    finally:
        worker.stop()
    fig = figures(
        "broker-sigstop",
        started,
        len(rows),
        windows,
        dlq,
        produced,
        stack,
        frozen=f"{frozen_for:.0f}s",
        windows_at_thaw=at_thaw,
        members_evicted=broker.log_count(EVICTED) - evicted_before,
        worker_rejoins=worker.log_path.read_text().count(REJOINED) - rejoined_before,
    )
    report(fig, worker)
    # Not asserted: whether the coordinator expires the members on SIGCONT depends on which
    # comes first after the thaw, the heartbeats queued in its sockets or its session timers
    # (3 evictions in most runs, 0 in one run under full-suite load). The figures say which.
    check_output(windows, dedupe_dlq(dlq), produced, stack)


# -- storage ----------------------------------------------------------------------------------


@dataclass
class Outage:
    produced: Produced
    expected: dict[tuple[str, int], dict[str, Any]]
    during: dict[str, float]  # the worker's metrics at the end of the outage
    down_for: float
    windows: list[Any]
    dlq: list[Any]
    worker: Worker  # stopped; its log tail goes into a failure's message


async def outage(
    stack: Stack,
    rows: list[tuple[bytes, bytes, bool]],
    log: Path,
    service: Any,
    *,
    progress: Callable[[Worker], bool],
    caught_up: Callable[[Worker, Produced, int], bool],
) -> Outage:
    """Half the rows in, the worker under way (`progress`), `service` stopped for OUTAGE
    while the other half comes in and every window is emitted, started again, and then the
    worker catches up (`caught_up`)."""
    first = await produce(stack.bootstrap, stack.quotes, rows[: len(rows) // 2])
    worker = Worker(stack, log)
    try:
        worker.wait_ready()
        await wait_until(lambda: progress(worker), 60, "progress before the outage", worker)
        service.stop()
        down_at = time.monotonic()
        second = await produce(stack.bootstrap, stack.quotes, rows[len(rows) // 2 :])
        produced = merge(first, second)
        expected, _ = expected_windows(produced.records)
        await wait_windows(stack, len(expected), OUTAGE, worker)
        await asyncio.sleep(max(0.0, down_at + OUTAGE - time.monotonic()))
        during = metrics(worker)
        service.start()
        down_for = time.monotonic() - down_at
        await wait_until(
            lambda: caught_up(worker, produced, len(expected)), 120, "caught up", worker
        )
        windows, dlq = await collect(stack, produced, worker)
    finally:
        worker.stop()
    return Outage(produced, expected, during, down_for, windows, dlq, worker)


async def test_object_store_down_for_a_minute(
    kafka_bootstrap: str, tmp_path: Path, s3: SeaweedS3
) -> None:
    """Half the data archived, the S3 server stopped, the other half produced; the
    aggregation finishes during the outage, the archive catches up after it."""
    started = time.monotonic()
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env=archive_env(**s3.env(), ARCHIVE_LOCAL_DIR=str(tmp_path / "unused")),
    )
    await create_topics(stack)
    rows = dataset(symbols=24, minutes=30, seed=37)

    def archived_total(worker: Worker) -> float:
        return metrics(worker).get("stockstream_archive_records_total", 0)

    run = await outage(
        stack,
        rows,
        tmp_path / "worker.log",
        s3,
        progress=lambda w: archived_total(w) >= 1000,
        caught_up=lambda w, produced, _: archived_total(w) >= len(produced.records),
    )
    s3.mirror(f"{stack.quotes}/", tmp_path / "mirror")
    archived = Counter(
        (r["kafka_partition"], r["kafka_offset"])
        for r in read_archive(tmp_path / "mirror", stack.quotes)
    )
    valid = Counter((r.partition, r.offset) for r in run.produced.records)
    fig = figures(
        "object-store-down",
        started,
        len(rows),
        run.windows,
        run.dlq,
        run.produced,
        stack,
        outage=f"{run.down_for:.0f}s",
        archive_blocked_during=run.during.get("stockstream_archive_blocked"),
        archived_during=int(run.during.get("stockstream_archive_records_total", 0)),
        archived=sum(archived.values()),
        archive_missing=sum((valid - archived).values()),
        archive_duplicated=sum((archived - valid).values()),
    )
    report(fig, run.worker, zero=("archive_missing", "archive_duplicated"))
    assert run.during.get("stockstream_archive_blocked") == 1, "the outage must block the archive"
    check_output(run.windows, dedupe_dlq(run.dlq), run.produced, stack)


async def test_warehouse_down_for_a_minute(
    kafka_bootstrap: str, own_bq_emulator: BigQueryEmulator, tmp_path: Path
) -> None:
    """BigQuery (the emulator, real client) stopped for a minute while windows keep coming;
    the loader backs off and loads every window once after it."""
    started = time.monotonic()
    emulator = own_bq_emulator
    stack = bq_stack(kafka_bootstrap, tmp_path, emulator, WAREHOUSE_RETRY_DEADLINE_SECONDS="3")
    await create_topics(stack)
    rows = dataset(symbols=12, minutes=30, seed=41)

    def written(worker: Worker) -> float:
        return metrics(worker).get('stockstream_warehouse_rows_total{outcome="written"}', 0)

    run = await outage(
        stack,
        rows,
        tmp_path / "worker.log",
        emulator,
        progress=lambda w: written(w) > 0,
        caught_up=lambda w, _, windows: written(w) >= windows,
    )
    loaded = bq_rows(emulator, stack.extra_env["BQ_DATASET"])
    keys = Counter((r["symbol"], r["window_start_ms"]) for r in loaded)
    fig = figures(
        "warehouse-down",
        started,
        len(rows),
        run.windows,
        run.dlq,
        run.produced,
        stack,
        outage=f"{run.down_for:.0f}s",
        warehouse_up_during=run.during.get("stockstream_warehouse_up"),
        warehouse_failures=int(run.during.get("stockstream_warehouse_failures_total", 0)),
        loaded_rows=len(loaded),
        loaded_missing=len(set(run.expected) - set(keys)),
        loaded_duplicated=sum(n - 1 for n in keys.values()),
    )
    report(fig, run.worker, zero=("loaded_missing", "loaded_duplicated"))
    assert run.during.get("stockstream_warehouse_up") == 0, "the outage must reach the loader"
    check_rows(loaded, run.expected)
    check_output(run.windows, dedupe_dlq(run.dlq), run.produced, stack)


# -- the worker -------------------------------------------------------------------------------

KILLS = 10


async def test_worker_sigkilled_ten_times_during_a_long_replay(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A backlog replayed by a worker that is SIGKILLed ten times and restarted right after
    each kill. Each incarnation is killed only once it is ready and has emitted 1/20 of the
    windows since the previous kill: every kill then hits a worker in the middle of its
    work (a kill during start-up would only repeat the start), and the ten kills use up at
    most half of the run, so it is still running at every one of them. The session timeout
    is the broker's minimum, 6 s: each restart waits for the killed member's session."""
    started = time.monotonic()
    stack = Stack(
        kafka_bootstrap,
        tmp_path / "data",
        extra_env={"STOCKSTREAM_SESSION_TIMEOUT_SECONDS": "6"},
    )
    await create_topics(stack)
    rows = dataset(symbols=24, minutes=60, seed=29)
    produced = await produce(kafka_bootstrap, stack.quotes, rows)
    expected, _ = expected_windows(produced.records)
    step = len(expected) // (2 * KILLS)
    at_kills: list[int] = []
    workers: list[Worker] = []
    for number in range(1, KILLS + 1):
        worker = Worker(stack, tmp_path / f"worker-{number:02d}.log")
        workers.append(worker)
        try:
            worker.wait_ready(120)
            before = await windows_out(stack)
            await wait_windows(stack, before + step, 120, worker)
        finally:
            worker.kill()
        at_kills.append(await windows_out(stack))
        assert at_kills[-1] < len(expected), f"kill {number} came after the end: {at_kills}"
    last = Worker(stack, tmp_path / "worker-last.log")
    workers.append(last)
    try:
        last.wait_ready(120)
        windows, dlq = await collect(stack, produced, last)
    finally:
        last.stop()
    fig = figures(
        "worker-sigkill-x10",
        started,
        len(rows),
        windows,
        dlq,
        produced,
        stack,
        kills=len(at_kills),
        windows_at_kills="/".join(map(str, at_kills)),
    )
    report(fig, *workers[-3:])
    check_output(windows, dedupe_dlq(dlq), produced, stack)


async def test_two_workers_one_killed_mid_rebalance(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Worker A owns all six partitions and works a backlog; worker B joins; as soon as A's
    /ready/ reports the rebalance, A is SIGKILLed. B, the survivor, takes every partition
    after A's session timeout and finishes."""
    started = time.monotonic()
    stack = Stack(kafka_bootstrap, tmp_path / "a", partitions=6)
    # Same run = same topics and group; own data dir (local tables, archive, DuckDB file).
    stack_b = Stack(kafka_bootstrap, tmp_path / "b", partitions=6, run=stack.run)
    await create_topics(stack)
    rows = dataset(symbols=36, minutes=40, seed=31)
    produced = await produce(kafka_bootstrap, stack.quotes, rows)
    assert len({r.partition for r in produced.records}) == 6
    expected, _ = expected_windows(produced.records)
    a = Worker(stack, tmp_path / "worker-a.log")
    b: Worker | None = None
    try:
        a.wait_ready()
        assert a.get("/ready/")[1]["partitions"] == list(range(6))
        await wait_windows(stack, len(expected) // 10, 120, a)
        b = Worker(stack_b, tmp_path / "worker-b.log")

        def rebalancing() -> bool:
            try:
                return bool(a.get("/ready/")[1]["rebalancing"])
            except OSError:
                return False

        await wait_until(rebalancing, 90, "worker A to start rebalancing", a, b, every=0.05)
        a.kill()
        at_kill = await windows_out(stack)
        assert at_kill < len(expected), "the kill must happen mid-run"
        b.wait_ready(120)
        survivor = b.get("/ready/")[1]["partitions"]
        windows, dlq = await collect(stack, produced, b)
    finally:
        a.stop()
        if b is not None:
            b.stop()
    fig = figures(
        "rebalance-kill",
        started,
        len(rows),
        windows,
        dlq,
        produced,
        stack,
        windows_at_kill=at_kill,
        survivor_partitions=len(survivor),
    )
    report(fig, a, b)
    check_output(windows, dedupe_dlq(dlq), produced, stack)
