"""Finnhub trades websocket: every trade of the configured symbols as a `finnhub-trade` quote.

Connects to `{FINNHUB_WS_URL}?token=KEY` with aiohttp's websocket client (a websocket ping
every `heartbeat_seconds`; a connection that does not answer is closed), sends
`{"type": "subscribe", "symbol": S}` for every symbol and handles:

- `{"type": "trade", "data": [{"s", "p", "t", "v", "c"}, ...]}`: several trades per message;
  each becomes Quote(current_price=p, market_timestamp=t (already epoch ms), volume=v,
  fetched_at=receive time, source="finnhub-trade", the day fields None). An unusable entry is
  counted and skipped, the others of the message are kept;
- `{"type": "ping"}`: Finnhub's keep-alive, counted;
- `{"type": "error", "msg": ...}`: logged (redacted) and counted;
- anything else (not JSON, not an object, unknown type): counted and logged.

A dropped or failed connection is re-opened with exponential backoff and jitter (reset once a
new connection delivers a message), and every symbol is subscribed again. A handshake refused
with HTTP 401/403 raises `FinnhubAuthError`. The token must be in the URL's query here, and
aiohttp errors quote the URL: everything logged goes through `redact`. Trade entries are
checked and mapped by `api.trade_to_quote`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import aiohttp
import orjson

from stockstream.contracts.quotes import Quote, Source
from stockstream.metrics import (
    SOURCE_MESSAGES,
    SOURCE_QUOTES,
    SOURCE_RECONNECTS,
    SOURCE_SKIPPED,
)
from stockstream.settings import FinnhubSettings, SettingsError
from stockstream.sources.finnhub.api import (
    FinnhubAuthError,
    FinnhubClient,
    MalformedTrade,
    now_ms,
    redact,
    trade_to_quote,
)

log = logging.getLogger(__name__)

SOURCE = Source.FINNHUB_TRADE.value


class FinnhubTradeSource(FinnhubClient):
    def __init__(
        self,
        settings: FinnhubSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        heartbeat_seconds: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`heartbeat_seconds` defaults to FINNHUB_TIMEOUT_SECONDS."""
        super().__init__(settings, session=session, rng=rng)
        if not settings.symbols:
            raise SettingsError("STOCK_SYMBOLS is empty: nothing to subscribe to")
        self._heartbeat = heartbeat_seconds or settings.timeout_seconds
        self._shown_url = redact(settings.ws_url, self._key)
        self.connections = 0  # successful connections so far (1 + reconnections)

    def __repr__(self) -> str:
        return f"FinnhubTradeSource(url={self._shown_url!r})"

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        settings = self._settings
        async with asyncio.timeout(settings.timeout_seconds):
            return await self._http().ws_connect(
                settings.ws_url,
                params={"token": self._key.reveal()},
                heartbeat=self._heartbeat,
                timeout=aiohttp.ClientWSTimeout(ws_close=settings.timeout_seconds),
            )

    async def quotes(self) -> AsyncIterator[Quote]:
        """Trades of the configured symbols as quotes, forever (reconnecting as needed)."""
        settings = self._settings
        failures = 0
        try:
            while True:
                detail = ""
                try:
                    async with await self._connect() as ws:
                        self.connections += 1
                        for symbol in settings.symbols:
                            await ws.send_str(
                                orjson.dumps({"type": "subscribe", "symbol": symbol}).decode()
                            )
                        log.info(
                            "subscribed to Finnhub trades",
                            extra={"url": self._shown_url, "symbols": len(settings.symbols)},
                        )
                        async for msg in ws:
                            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                                failures = 0  # the connection works: next drop starts over
                                for quote in self.handle_message(msg.data):
                                    SOURCE_QUOTES.labels(SOURCE).inc()
                                    yield quote
                            elif msg.type == aiohttp.WSMsgType.ERROR:
                                detail = redact(f"websocket error: {ws.exception()}", self._key)
                                break
                        if not detail:
                            detail = f"closed by the server (code {ws.close_code})"
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status in (401, 403):
                        raise FinnhubAuthError.rejected(
                            f"websocket handshake got HTTP {exc.status}"
                        ) from None
                    detail = f"handshake refused: HTTP {exc.status}"
                except TimeoutError:
                    detail = f"no answer within {settings.timeout_seconds}s"
                except aiohttp.ClientError as exc:
                    detail = self._describe(exc)
                delay = self._delay(failures)
                failures += 1
                SOURCE_RECONNECTS.labels(SOURCE).inc()
                log.warning(
                    "Finnhub trades websocket lost, reconnecting",
                    extra={
                        "url": self._shown_url,
                        "detail": detail,
                        "delay_seconds": round(delay, 3),
                        "failures": failures,
                    },
                )
                await asyncio.sleep(delay)
        finally:
            await self.close()

    def handle_message(self, data: str | bytes) -> list[Quote]:
        """The quotes in one websocket message (empty for pings, errors and garbage)."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return self._bad_message(f"not JSON: {exc}", data)
        if not isinstance(message, dict):
            return self._bad_message(f"expected an object, got {type(message).__name__}", data)
        kind = message.get("type")
        if kind == "trade":
            trades = message.get("data")
            if not isinstance(trades, list):
                return self._bad_message("trade message without a data list", data)
            SOURCE_MESSAGES.labels(SOURCE, "trade").inc()
            fetched_at = now_ms()
            quotes = []
            for trade in trades:
                try:
                    quotes.append(trade_to_quote(trade, fetched_at))
                except MalformedTrade as exc:
                    SOURCE_SKIPPED.labels(SOURCE, "malformed").inc()
                    log.warning(
                        "malformed Finnhub trade skipped",
                        extra={"source": SOURCE, "detail": str(exc)},
                    )
            return quotes
        if kind == "ping":
            SOURCE_MESSAGES.labels(SOURCE, "ping").inc()
            return []
        if kind == "error":
            SOURCE_MESSAGES.labels(SOURCE, "error").inc()
            log.warning(
                "Finnhub websocket error message",
                extra={"source": SOURCE, "detail": redact(str(message.get("msg")), self._key)},
            )
            return []
        SOURCE_MESSAGES.labels(SOURCE, "other").inc()
        log.debug("ignored Finnhub websocket message", extra={"type": str(kind)[:40]})
        return []

    def _bad_message(self, detail: str, data: str | bytes) -> list[Quote]:
        SOURCE_MESSAGES.labels(SOURCE, "malformed").inc()
        excerpt = data[:120] if isinstance(data, str) else data[:120].decode("utf-8", "replace")
        log.warning(
            "malformed Finnhub websocket message skipped",
            extra={"source": SOURCE, "detail": redact(f"{detail}; starts {excerpt!r}", self._key)},
        )
        return []
