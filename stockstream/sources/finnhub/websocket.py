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

Finnhub's limits, which its documentation hardly mentions:

- **One websocket per API key.** A second connection on the key gets the older one closed
  within about a second. Two replicas (or another program) on one key knock each other off
  in a reconnect storm, each connection living a moment. A connection the server ends within
  `short_connection_seconds` (5 s) of opening is counted
  (`stockstream_source_ws_short_connections_total`); `storm_after` (3) of them in a row are
  taken as another client on the key: one error line says so
  (`stockstream_source_ws_key_conflicts_total`), and until a connection lives longer the
  pause before reconnecting is drawn from `storm_backoff` (5 s doubling to 60 s, jittered)
  instead of the usual backoff, so that the other client gets the socket rather than a
  tight fight over it. Replicas avoid the storm altogether by sharing a `SocketLease`
  (socket_lease.py; used when REDIS_URL is set): only the lease holder connects, and it
  closes its socket at once if it loses the lease.
- **About 50 symbols per connection.** Beyond the cap Finnhub answers
  `{"type": "error", "msg": "Subscribing to too many symbols"}` per refused subscription,
  without naming the symbol, and those symbols get nothing. Only the first
  FINNHUB_WS_MAX_SYMBOLS (50) configured symbols are subscribed; the others are named in one
  error line at start and counted in `stockstream_source_ws_unsubscribed_symbols`. If
  Finnhub's cap is lower still, each refusal is counted
  (`stockstream_source_ws_subscriptions_refused_total`) and logged with the symbols
  subscribed last: the n-th refusal of a connection most likely concerns the last n sent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson

from stockstream.contracts.quotes import Quote, Source
from stockstream.metrics import (
    SOURCE_MESSAGES,
    SOURCE_QUOTES,
    SOURCE_RECONNECTS,
    SOURCE_SKIPPED,
    SOURCE_WS_KEY_CONFLICTS,
    SOURCE_WS_REFUSED,
    SOURCE_WS_SHORT_CONNECTIONS,
    SOURCE_WS_UNSUBSCRIBED,
)
from stockstream.retry import Backoff
from stockstream.settings import FinnhubSettings, SettingsError
from stockstream.sources.finnhub.api import (
    FinnhubAuthError,
    FinnhubClient,
    MalformedTrade,
    now_ms,
    redact,
    trade_to_quote,
)
from stockstream.sources.finnhub.socket_lease import SocketLease

log = logging.getLogger(__name__)

SOURCE = Source.FINNHUB_TRADE.value
TOO_MANY_SYMBOLS = "Subscribing to too many symbols"
KEY_CONFLICT = "another connection uses this API key; Finnhub allows one per key"
# How many symbols a log line names at most (a refusal's suspects, the unsubscribed ones).
_NAMED = 50


class FinnhubTradeSource(FinnhubClient):
    def __init__(
        self,
        settings: FinnhubSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        heartbeat_seconds: float | None = None,
        rng: random.Random | None = None,
        lease: SocketLease | None = None,
        short_connection_seconds: float = 5.0,
        storm_after: int = 3,
        storm_backoff: Backoff | None = None,
    ) -> None:
        """`heartbeat_seconds` defaults to FINNHUB_TIMEOUT_SECONDS. With a `lease` the source
        connects only while it holds it; the lease is released when the stream ends, and
        closed by its owner."""
        super().__init__(settings, session=session, rng=rng)
        if not settings.symbols:
            raise SettingsError("STOCK_SYMBOLS is empty: nothing to subscribe to")
        if storm_after < 1:
            raise ValueError(f"storm_after must be >= 1, got {storm_after}")
        self._heartbeat = heartbeat_seconds or settings.timeout_seconds
        self._shown_url = redact(settings.ws_url, self._key)
        self._lease = lease
        self._short = short_connection_seconds
        self._storm_after = storm_after
        self._storm_backoff = storm_backoff or Backoff(5.0, 60.0)
        self.connections = 0  # successful connections so far (1 + reconnections)
        self.storms = 0  # reconnect storms detected (another client on the key)
        wanted = list(dict.fromkeys(settings.symbols))
        self.symbols = tuple(wanted[: settings.ws_max_symbols])
        self.unsubscribed = tuple(wanted[settings.ws_max_symbols :])
        SOURCE_WS_UNSUBSCRIBED.labels(SOURCE).set(len(self.unsubscribed))
        if self.unsubscribed:
            log.error(
                "more symbols than one Finnhub websocket takes: these are not subscribed",
                extra={
                    "source": SOURCE,
                    "max_symbols": settings.ws_max_symbols,
                    "unsubscribed": len(self.unsubscribed),
                    "symbols": list(self.unsubscribed[:_NAMED]),
                    "fix": "raise FINNHUB_WS_MAX_SYMBOLS if the plan allows more, or split"
                    " STOCK_SYMBOLS between producers with different API keys",
                },
            )
        # This connection's subscriptions, in the order sent, and its refusals so far.
        self._sent: list[str] = []
        self._refused = 0

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

    async def _close_when_lease_lost(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        assert self._lease is not None
        await self._lease.wait_lost()
        # Another replica holds the lease and is connecting: ours must go now.
        await ws.close()

    async def quotes(self) -> AsyncIterator[Quote]:
        """Trades of the configured symbols as quotes, forever (reconnecting as needed)."""
        settings = self._settings
        failures = 0
        short_streak = 0
        try:
            while True:
                if self._lease is not None:
                    await self._lease.acquire()
                detail = ""
                opened_at: float | None = None
                watcher: asyncio.Task[None] | None = None
                try:
                    async with await self._connect() as ws:
                        opened_at = time.monotonic()
                        self.connections += 1
                        if self._lease is not None:
                            watcher = asyncio.create_task(self._close_when_lease_lost(ws))
                        self._sent, self._refused = [], 0
                        for symbol in self.symbols:
                            await ws.send_str(
                                orjson.dumps({"type": "subscribe", "symbol": symbol}).decode()
                            )
                            self._sent.append(symbol)
                        log.info(
                            "subscribed to Finnhub trades",
                            extra={"url": self._shown_url, "symbols": len(self.symbols)},
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
                finally:
                    if watcher is not None:
                        watcher.cancel()  # not awaited: that could swallow our own cancellation
                if self._lease is not None and self._lease.lost:
                    continue  # logged by the lease; acquire() stands by behind the new holder
                if opened_at is not None:
                    short_streak = self._after_connection(opened_at, short_streak)
                delay = self._delay(failures)
                if short_streak >= self._storm_after:
                    delay = max(
                        delay,
                        self._storm_backoff.delay(short_streak - self._storm_after, self._rng),
                    )
                failures += 1
                SOURCE_RECONNECTS.labels(SOURCE).inc()
                log.warning(
                    "Finnhub trades websocket lost, reconnecting",
                    extra={
                        "url": self._shown_url,
                        "detail": detail,
                        "delay_seconds": round(delay, 3),
                        "failures": failures,
                        "short_connections": short_streak,
                    },
                )
                await asyncio.sleep(delay)
        finally:
            if self._lease is not None:
                await self._lease.release()
            await self.close()

    def _after_connection(self, opened_at: float, short_streak: int) -> int:
        """The run of short-lived connections after this one ended; reports a storm once."""
        lived = time.monotonic() - opened_at
        if lived >= self._short:
            return 0
        short_streak += 1
        SOURCE_WS_SHORT_CONNECTIONS.labels(SOURCE).inc()
        if short_streak == self._storm_after:
            self.storms += 1
            SOURCE_WS_KEY_CONFLICTS.labels(SOURCE).inc()
            log.error(
                f"Finnhub keeps closing the trades websocket right after it opens: {KEY_CONFLICT}",
                extra={
                    "source": SOURCE,
                    "url": self._shown_url,
                    "short_connections": short_streak,
                    "lived_seconds": round(lived, 3),
                    "fix": "run one finnhub-ws producer per API key, or give the replicas"
                    " REDIS_URL so that they take turns",
                },
            )
        return short_streak

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
            text = str(message.get("msg"))
            if TOO_MANY_SYMBOLS.lower() in text.lower():
                self._subscription_refused(text)
                return []
            log.warning(
                "Finnhub websocket error message",
                extra={"source": SOURCE, "detail": redact(text, self._key)},
            )
            return []
        SOURCE_MESSAGES.labels(SOURCE, "other").inc()
        log.debug("ignored Finnhub websocket message", extra={"type": str(kind)[:40]})
        return []

    def _subscription_refused(self, text: str) -> None:
        # Finnhub answers subscriptions in order and names none: the n-th refusal of this
        # connection most likely concerns the n symbols sent last.
        self._refused += 1
        SOURCE_WS_REFUSED.labels(SOURCE).inc()
        suspects = self._sent[-self._refused :] if self._sent else []
        log.error(
            "Finnhub refused a subscription: its symbol cap is below FINNHUB_WS_MAX_SYMBOLS",
            extra={
                "source": SOURCE,
                "detail": redact(text, self._key),
                "refused": self._refused,
                "subscribed": len(self._sent),
                "likely_refused": suspects[-_NAMED:],
                "max_symbols": self._settings.ws_max_symbols,
                "fix": "set FINNHUB_WS_MAX_SYMBOLS to at most"
                f" {max(1, len(self._sent) - self._refused)}",
            },
        )

    def _bad_message(self, detail: str, data: str | bytes) -> list[Quote]:
        SOURCE_MESSAGES.labels(SOURCE, "malformed").inc()
        excerpt = data[:120] if isinstance(data, str) else data[:120].decode("utf-8", "replace")
        log.warning(
            "malformed Finnhub websocket message skipped",
            extra={"source": SOURCE, "detail": redact(f"{detail}; starts {excerpt!r}", self._key)},
        )
        return []
