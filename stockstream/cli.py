"""`stockstream` command: the project's own operations (the worker itself is `faust -A stockstream
worker`). Sub-commands: `produce`, `topics`, `tail`, `config`, `dlq redrive`, `backfill`,
`gaps`, `alert`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from typing import Any

from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.quotes import ContractError, QuoteValidator
from stockstream.envconfig import redact_url
from stockstream.logs import setup_logging
from stockstream.settings import Secret, Settings, SettingsError, load_settings

log = logging.getLogger("stockstream.cli")


def _source(settings: Settings, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """(async iterator of quotes, objects to close) for the chosen source."""
    from pathlib import Path

    if args.source == "simulate":
        from stockstream.sources.simulator import Simulator, SimulatorSource

        sim = settings.simulator
        simulator = Simulator(
            symbols=_symbol_count(args.symbols) or sim.symbols,
            seed=sim.seed if args.seed is None else args.seed,
            rate=args.rate or sim.rate,
            start_ms=args.start_ms,
        )
        return SimulatorSource(simulator, count=args.count, paced=not args.fast).quotes(), []
    if args.source == "archive":
        from stockstream.recovery.commands import archive_replay

        return archive_replay(settings, args.from_, args.to, args.symbols).quotes(), []
    if args.source == "replay":
        from stockstream.sources.replay import ReplaySource

        if not args.files:
            raise SystemExit("stockstream produce --source replay needs --files PATH [PATH ...]")
        speed = settings.replay.speed if args.speed is None else args.speed
        replay = ReplaySource(
            [Path(f) for f in args.files],
            speed=0.0 if args.fast else speed,
            validator=QuoteValidator.from_settings(settings.quotes),
        )
        return replay.quotes(), []
    if not settings.finnhub.api_key:
        raise SystemExit(
            "configuration error: FINNHUB_API_KEY (or FINNHUB_API_KEY_FILE) is required"
            f" for --source {args.source}"
        )
    if args.source == "finnhub":
        from stockstream.sources.finnhub import cache as quote_cache
        from stockstream.sources.finnhub.rest import FinnhubQuoteSource

        cache = quote_cache.from_settings(settings.cache)
        rest = FinnhubQuoteSource(settings.finnhub, cache=cache)
        return rest.quotes(), [rest, *([cache] if cache else [])]
    from stockstream.sources.finnhub import socket_lease
    from stockstream.sources.finnhub.websocket import FinnhubTradeSource

    # One websocket per API key: with REDIS_URL, replicas take turns holding it.
    lease = socket_lease.from_settings(settings.finnhub, settings.cache)
    ws = FinnhubTradeSource(settings.finnhub, lease=lease)
    return ws.quotes(), [ws, *([lease] if lease else [])]


def _symbol_count(value: str | None) -> int | None:
    """`--symbols` of the simulator: a number of symbols (the archive source takes names)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(
            f"stockstream produce --source simulate: --symbols expects a number, got {value!r}"
        ) from None


def _check_symbols(symbols: tuple[str, ...], validator: QuoteValidator) -> None:
    """Refuse, before anything is sent, symbols every quote of which the worker would
    dead-letter (and a symbol listed twice, which would be polled twice)."""
    problems = [
        f"{symbol!r} is listed twice"
        for symbol in sorted({s for s in symbols if symbols.count(s) > 1})
    ]
    for symbol in symbols:
        try:
            validator.check_symbol(symbol)
        except ContractError as exc:
            problems.append(exc.error)
    if problems:
        raise SystemExit("configuration error: STOCK_SYMBOLS: " + "; ".join(problems))


async def _produce(settings: Settings, args: argparse.Namespace) -> int:
    from stockstream.kafka.clients import KafkaAccessError

    if args.source in ("finnhub", "finnhub-ws"):
        _check_symbols(settings.finnhub.symbols, QuoteValidator.from_settings(settings.quotes))
    from stockstream.kafka.topics import ensure_topics
    from stockstream.producer.quote_producer import QuoteProducer

    try:
        await ensure_topics(settings)
    except KafkaAccessError:
        raise  # refused credentials or TLS: spooling would wait forever
    except Exception as exc:
        # The producer spools while the broker is away; topics are checked again by the worker.
        log.warning("could not check topics, producing anyway", extra={"error": repr(exc)})
    quotes, closables = _source(settings, args)
    if settings.producer.metrics_port:
        from prometheus_client import start_http_server

        from stockstream.metrics import REGISTRY

        start_http_server(
            settings.producer.metrics_port, addr=settings.producer.metrics_host, registry=REGISTRY
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "producing quotes",
        extra={"topic": settings.kafka.quotes_topic, "source": args.source, "count": args.count},
    )

    async def pump(producer: QuoteProducer) -> None:
        async for quote in quotes:
            await producer.send(quote)

    try:
        async with QuoteProducer(settings) as producer:
            pumping = asyncio.ensure_future(pump(producer))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({pumping, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (pumping, stopping):
                task.cancel()
            await asyncio.gather(pumping, stopping, return_exceptions=True)
            if pumping.done() and not pumping.cancelled() and pumping.exception():
                raise pumping.exception()  # type: ignore[misc]
            await producer.flush()
            log.info(
                "producer done",
                extra={
                    "sent": producer.sent,
                    "failed": producer.failed,
                    "spooled": producer.spooled,
                    "spool_pending": producer.spool_pending,
                },
            )
    finally:
        for closable in closables:
            await closable.close()
    return 0


def _config(settings: Settings) -> int:
    def plain(value: Any) -> Any:
        if isinstance(value, Secret):
            return "***" if value else ""
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, str):
            return redact_url(value)
        return str(value) if not isinstance(value, int | float | bool) else value

    print(json.dumps(plain(settings), indent=2))
    return 0


async def _topics(settings: Settings) -> int:
    from stockstream.kafka.topics import ensure_topics, topic_specs

    await ensure_topics(settings)
    for spec in topic_specs(settings):
        print(f"{spec.name}\t{spec.partitions} partitions")
    return 0


async def _tail(settings: Settings, which: str, from_beginning: bool) -> int:
    """Print a topic's records as JSON lines until interrupted (a debugging aid)."""
    from stockstream.kafka import clients

    topic = {
        "quotes": settings.kafka.quotes_topic,
        "aggregated": settings.kafka.aggregated_topic,
        "dlq": settings.kafka.dlq_topic,
    }[which]
    consumer = clients.consumer(
        settings.kafka,
        topic,
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        isolation_level="read_committed",
    )
    # Our own signal handling: a SIGINT that cancels the task inside aiokafka's fetch was
    # seen to leave the process hanging on exit; a flag checked between polls cannot.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await clients.start(consumer, settings.kafka)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    value = record.value.decode("utf-8", "replace") if record.value else None
                    print(f"{record.partition}:{record.offset}\t{value}", flush=True)
    finally:
        try:
            async with asyncio.timeout(10):
                await consumer.stop()
        except TimeoutError:
            log.warning("tail: the consumer did not stop within 10 s")
    return 0


async def _alert(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when every configured receiver took the notice (or none is configured, which is
    said on stderr), 1 when one gave up; one JSON line {receiver: outcome} on stdout."""
    from stockstream.alerts.notices import notice, notice_receivers, send_notice

    record = notice(
        args.title,
        args.text,
        dedup_key=args.dedup_key,
        severity=args.severity,
        link=args.link,
        source=args.source,
    )
    receivers = notice_receivers(settings.alerts, args.source)
    if not receivers:
        print("stockstream alert: no receiver configured (ALERT_*), nothing sent", file=sys.stderr)
    outcome = await send_notice(settings.alerts, record, receivers)
    print(json.dumps(outcome))
    return 0 if all(v == "delivered" for v in outcome.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stockstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    produce = sub.add_parser("produce", help="feed stock-quotes from a source")
    produce.add_argument(
        "--source",
        choices=["simulate", "finnhub", "finnhub-ws", "replay", "archive"],
        default="simulate",
    )
    produce.add_argument("--count", type=int, default=None, help="simulate: stop after N quotes")
    produce.add_argument("--files", nargs="+", help="replay: NDJSON/CSV files or directories")
    produce.add_argument(
        "--speed", type=float, default=None, help="replay: 1 = original pace, 10, 0 = no pauses"
    )
    produce.add_argument(
        "--symbols", default=None, help="simulate: number of symbols; archive: A,B (default all)"
    )
    produce.add_argument("--from", dest="from_", help="archive: ISO start (inclusive, UTC)")
    produce.add_argument("--to", help="archive: ISO end (exclusive, UTC)")
    produce.add_argument("--rate", type=float, default=None, help="quotes per second")
    produce.add_argument("--seed", type=int, default=None)
    produce.add_argument("--start-ms", type=int, default=None, help="event time of the first quote")
    produce.add_argument(
        "--fast",
        action="store_true",
        help="simulate/replay: send as fast as possible instead of at event-time pace",
    )
    tail = sub.add_parser("tail", help="print records of a topic as they arrive")
    tail.add_argument("which", choices=["quotes", "aggregated", "dlq"])
    tail.add_argument("--from-beginning", action="store_true")
    backfill = sub.add_parser(
        "backfill", help="recompute windows of a time range from the archive into the warehouse"
    )
    backfill.add_argument("--from", dest="from_", required=True, help="ISO start (inclusive)")
    backfill.add_argument("--to", required=True, help="ISO end (exclusive); UTC without a zone")
    backfill.add_argument("--symbols", default=None, help="A,B (default: every symbol)")
    backfill.add_argument("--json", action="store_true", help="print the summary as JSON")
    gaps = sub.add_parser(
        "gaps", help="windows of a day the warehouse lacks while the archive has quotes for them"
    )
    gaps.add_argument("--day", required=True, help="YYYY-MM-DD (UTC)")
    gaps.add_argument("--json", action="store_true", help="machine-readable report")
    alert = sub.add_parser(
        "alert", help="send an operational notice (a failed batch job) to the alert receivers"
    )
    alert.add_argument("--title", required=True, help="one line, e.g. 'stockstream_dbt failed'")
    alert.add_argument("--text", default="", help="what failed and where to look")
    alert.add_argument(
        "--severity", choices=["critical", "error", "warning", "info"], default="error"
    )
    alert.add_argument("--dedup-key", required=True, help="the same key updates one incident")
    alert.add_argument("--link", default="", help="URL of the log")
    alert.add_argument("--source", default="stockstream", help="who reports it (e.g. airflow)")
    sub.add_parser("topics", help="create the topics (idempotent) and list them")
    sub.add_parser("config", help="print the effective configuration (secrets masked)")
    dlq = sub.add_parser("dlq", help="dead-letter queue operations")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    redrive = dlq_sub.add_parser(
        "redrive",
        # `replay` was its first name; kept so existing scripts and runbooks keep working.
        aliases=["replay"],
        help="re-drive dead-lettered records once the cause is fixed (default: archive-failed)",
    )
    reasons = redrive.add_mutually_exclusive_group()
    reasons.add_argument(
        "--reason",
        action="append",
        choices=[r.value for r in Reason],
        help="reason to re-drive (repeatable; default archive-failed)",
    )
    reasons.add_argument("--any-reason", action="store_true", help="every reason")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log.level, settings.log.format)
    if args.command == "config":
        return _config(settings)
    from stockstream.kafka.clients import KafkaAccessError

    try:
        return _run(settings, args)
    except SettingsError as exc:  # e.g. a TLS file that cannot be loaded
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KafkaAccessError as exc:  # never retried: the same login would fail again
        print(f"stockstream {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "topics":
        return asyncio.run(_topics(settings))
    if args.command == "dlq":
        from stockstream.redrive import RedriveError, redrive_dead_letters

        chosen = None if args.any_reason else (args.reason or ["archive-failed"])
        try:
            count = asyncio.run(redrive_dead_letters(settings, chosen))
        except RedriveError as exc:
            print(f"dlq redrive: {exc}", file=sys.stderr)
            return 1
        print(f"re-drove {count} dead-lettered record(s)")
        return 0
    if args.command in ("backfill", "gaps"):
        from stockstream.recovery.commands import run_backfill, run_gaps

        if args.command == "backfill":
            return asyncio.run(run_backfill(settings, args.from_, args.to, args.symbols, args.json))
        return asyncio.run(run_gaps(settings, args.day, args.json))
    if args.command == "alert":
        return asyncio.run(_alert(settings, args))
    if args.command == "tail":
        try:
            return asyncio.run(_tail(settings, args.which, args.from_beginning))
        except KeyboardInterrupt:
            return 0
    from stockstream.sources.finnhub.api import FinnhubAuthError

    try:
        return asyncio.run(_produce(settings, args))
    except FinnhubAuthError as exc:  # a bad key, or one that may see none of the symbols
        print(f"stockstream produce: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
