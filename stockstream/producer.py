"""The one path every source uses to write `stock-quotes`: keyed by symbol, acks=all,
idempotent, batched and compressed. Delivery of every record is checked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer

from stockstream.contracts import Quote
from stockstream.settings import Settings
from stockstream.topics import bootstrap_list

log = logging.getLogger(__name__)


class QuoteProducer:
    def __init__(self, settings: Settings) -> None:
        p = settings.producer
        self._topic = settings.kafka.quotes_topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_list(settings),
            acks="all",
            enable_idempotence=True,
            linger_ms=p.linger_ms,
            max_batch_size=p.batch_bytes,
            compression_type=None if p.compression == "none" else p.compression,
            request_timeout_ms=p.request_timeout_ms,
        )
        self._pending: set[asyncio.Future[Any]] = set()
        self.sent = 0
        self.failed = 0

    async def __aenter__(self) -> QuoteProducer:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.flush()
        finally:
            await self._producer.stop()

    def _on_delivery(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1
            log.error(
                "delivery failed",
                extra={"topic": self._topic, "error": repr(fut.exception())},
            )
        else:
            self.sent += 1

    async def send(self, quote: Quote) -> None:
        """Queue one quote; waits only when the producer's buffer is full (back-pressure)."""
        fut = await self._producer.send(
            self._topic, value=quote.to_json(), key=quote.symbol.encode()
        )
        self._pending.add(fut)
        fut.add_done_callback(self._on_delivery)

    async def send_all(self, quotes: Iterable[Quote] | AsyncIterator[Quote]) -> int:
        count = 0
        if isinstance(quotes, AsyncIterator):
            async for quote in quotes:
                await self.send(quote)
                count += 1
        else:
            for quote in quotes:
                await self.send(quote)
                count += 1
        await self.flush()
        return count

    async def flush(self) -> None:
        await self._producer.flush()
        if self._pending:
            await asyncio.wait(set(self._pending))
        if self.failed:
            raise RuntimeError(f"{self.failed} record(s) were not delivered to {self._topic}")
