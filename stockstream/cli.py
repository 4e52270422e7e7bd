"""`stockstream` command: the project's own operations (the worker itself is `faust -A stockstream
worker`). Sub-commands: `produce`, `topics`, `tail`, `config`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from stockstream.contracts import Quote
from stockstream.logs import setup_logging
from stockstream.settings import Secret, Settings, SettingsError, load_settings

log = logging.getLogger("stockstream.cli")


async def _paced(quotes: Iterator[Quote], stop: asyncio.Event) -> AsyncIterator[Quote]:
    """Release each quote when the wall clock reaches its event time (a live feed)."""
    for quote in quotes:
        if stop.is_set():
            return
        delay = quote.market_timestamp / 1000 - time.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
        yield quote


async def _produce(settings: Settings, args: argparse.Namespace) -> int:
    from stockstream.producer import QuoteProducer
    from stockstream.sources.simulator import Simulator
    from stockstream.topics import ensure_topics

    await ensure_topics(settings)
    sim = settings.simulator
    simulator = Simulator(
        symbols=args.symbols or sim.symbols,
        seed=sim.seed if args.seed is None else args.seed,
        rate=args.rate or sim.rate,
        start_ms=args.start_ms,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    quotes = simulator.quotes(args.count)
    log.info(
        "producing simulated quotes",
        extra={
            "topic": settings.kafka.quotes_topic,
            "symbols": len(simulator.symbols),
            "count": args.count,
            "paced": not args.fast,
        },
    )
    async with QuoteProducer(settings) as producer:
        if args.fast:
            for quote in quotes:
                if stop.is_set():
                    break
                await producer.send(quote)
        else:
            async for quote in _paced(quotes, stop):
                await producer.send(quote)
        await producer.flush()
        log.info("producer done", extra={"sent": producer.sent, "failed": producer.failed})
    return 0


def _config(settings: Settings) -> int:
    def plain(value: Any) -> Any:
        if isinstance(value, Secret):
            return "***" if value else ""
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return list(value)
        return str(value) if not isinstance(value, int | float | str | bool) else value

    print(json.dumps(plain(settings), indent=2))
    return 0


async def _topics(settings: Settings) -> int:
    from stockstream.topics import ensure_topics, topic_specs

    await ensure_topics(settings)
    for spec in topic_specs(settings):
        print(f"{spec.name}\t{spec.partitions} partitions")
    return 0


async def _tail(settings: Settings, which: str, from_beginning: bool) -> int:
    """Print a topic's records as JSON lines until interrupted (a debugging aid)."""
    from aiokafka import AIOKafkaConsumer

    from stockstream.topics import bootstrap_list

    topic = {
        "quotes": settings.kafka.quotes_topic,
        "aggregated": settings.kafka.aggregated_topic,
        "dlq": settings.kafka.dlq_topic,
    }[which]
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_list(settings),
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        async for record in consumer:
            value = record.value.decode("utf-8", "replace") if record.value else None
            print(f"{record.partition}:{record.offset}\t{value}", flush=True)
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stockstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    produce = sub.add_parser("produce", help="feed stock-quotes from a source")
    produce.add_argument("--source", choices=["simulate"], default="simulate")
    produce.add_argument("--count", type=int, default=None, help="stop after N quotes")
    produce.add_argument("--symbols", type=int, default=None, help="number of symbols")
    produce.add_argument("--rate", type=float, default=None, help="quotes per second")
    produce.add_argument("--seed", type=int, default=None)
    produce.add_argument("--start-ms", type=int, default=None, help="event time of the first quote")
    produce.add_argument(
        "--fast", action="store_true", help="send as fast as possible instead of in real time"
    )
    tail = sub.add_parser("tail", help="print records of a topic as they arrive")
    tail.add_argument("which", choices=["quotes", "aggregated", "dlq"])
    tail.add_argument("--from-beginning", action="store_true")
    sub.add_parser("topics", help="create the topics (idempotent) and list them")
    sub.add_parser("config", help="print the effective configuration (secrets masked)")
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
    if args.command == "topics":
        return asyncio.run(_topics(settings))
    if args.command == "tail":
        try:
            return asyncio.run(_tail(settings, args.which, args.from_beginning))
        except KeyboardInterrupt:
            return 0
    return asyncio.run(_produce(settings, args))


if __name__ == "__main__":
    sys.exit(main())
