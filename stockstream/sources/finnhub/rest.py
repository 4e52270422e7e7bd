"""Finnhub REST quotes: polls `GET {FINNHUB_BASE_URL}/quote?symbol=S` for every configured symbol.

- Budget: every HTTP call (retries included) first takes a slot from a `RateLimiter` built from
  FINNHUB_CALLS_PER_MINUTE / FINNHUB_MAX_CALLS_PER_SECOND. HTTP 429 pauses that limiter for
  everyone (`Retry-After` when the answer has one, else exponential backoff with jitter that
  grows with consecutive 429s), then the call is retried.
- Timeouts (FINNHUB_TIMEOUT_SECONDS), connection errors and 5xx are retried up to
  FINNHUB_MAX_RETRIES times with exponential backoff and jitter; after that the symbol is
  skipped for this poll. Other 4xx are skipped without retry.
- 401/403 are told apart by their body (Finnhub answers both for two different things):
  "You don't have access to this resource." (or a plan/subscription message) means the key
  may not see *this symbol* (e.g. SBIN.NS on a free key): it is reported once (warning,
  `stockstream_source_denied_symbols`), skipped and asked again every
  FINNHUB_DENIED_RECHECK_SECONDS, the other symbols keep polling. "Invalid API key." raises
  `FinnhubAuthError`, which stops the source: a bad key does not heal itself. A body that says
  neither counts as a symbol denial once the key has been seen to work, else as a bad key.
  When every configured symbol is denied, `FinnhubNoAccess` stops the source.
- `X-Ratelimit-Remaining` / `X-Ratelimit-Reset` (epoch seconds), when Finnhub sends them, pace
  the calls: what remains of the budget is spread over the time left until the reset.
- An unknown symbol (Finnhub answers `c=0, t=0`) is reported once (warning + metric) and
  skipped on every poll; a zero price never reaches the stream. A malformed answer (not JSON,
  not an object, a field missing or of the wrong type) is logged, counted and skipped.
- `quotes()` yields a quote only when its `t` is newer than the last one it yielded for that
  symbol: an unchanged quote is not re-sent.
- The key travels in the `X-Finnhub-Token` header, never in the URL, so aiohttp errors (which
  quote the URL) cannot leak it; every logged text is passed through `redact` anyway.
- With a `QuoteCache` (Redis), answers are shared between replicas; see `cache.py`.

Payload checks, the mapping to `Quote` and `redact` are shared with the websocket: `api.py`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from stockstream.contracts.quotes import Quote, Source
from stockstream.metrics import (
    SOURCE_DENIED_SYMBOLS,
    SOURCE_QUOTES,
    SOURCE_RATE_LIMIT_WAIT,
    SOURCE_RATE_LIMITED,
    SOURCE_REQUESTS,
    SOURCE_RETRIES,
    SOURCE_SKIPPED,
    SOURCE_UNKNOWN_SYMBOLS,
)
from stockstream.settings import FinnhubSettings, SettingsError
from stockstream.sources.finnhub.api import (
    MAX_RETRY_AFTER_SECONDS,
    FinnhubAuthError,
    FinnhubClient,
    FinnhubNoAccess,
    MalformedAnswer,
    denial_kind,
    error_text,
    is_unknown_symbol,
    now_ms,
    parse_retry_after,
    redact,
    to_quote,
    validate_answer,
)
from stockstream.sources.finnhub.cache import QuoteCache
from stockstream.sources.ratelimit import RateLimiter

log = logging.getLogger(__name__)

SOURCE = Source.FINNHUB_QUOTE.value


class FinnhubQuoteSource(FinnhubClient):
    def __init__(
        self,
        settings: FinnhubSettings,
        *,
        cache: QuoteCache | None = None,
        session: aiohttp.ClientSession | None = None,
        limiter: RateLimiter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`limiter`: share one budget between several sources of the same key (default: own)."""
        super().__init__(settings, session=session, rng=rng)
        self._cache = cache
        self._limiter = limiter or RateLimiter(
            settings.calls_per_minute, settings.max_calls_per_second
        )
        self._url = settings.base_url.rstrip("/") + "/quote"
        self._path = URL(self._url).path
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
        self._consecutive_429 = 0
        self._unknown: set[str] = set()
        # Symbols the key may not see -> when to ask again (time.monotonic()).
        self._denied: dict[str, float] = {}
        self._key_works = False
        self._last_sent: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"FinnhubQuoteSource(url={redact(self._url, self._key)!r})"

    @property
    def limiter(self) -> RateLimiter:
        return self._limiter

    # -- one logical call --------------------------------------------------------------------

    async def fetch(self, symbol: str) -> Quote | None:
        """The current quote of `symbol` (retries included); None = nothing usable this time.

        Raises FinnhubAuthError when the key is rejected.
        """
        recheck_at = self._denied.get(symbol)
        if recheck_at is not None and time.monotonic() < recheck_at:
            SOURCE_SKIPPED.labels(SOURCE, "no_access").inc()
            return None
        if self._cache is not None:
            raw = await self._cache.get_or_fetch(symbol, lambda: self._call_encoded(symbol))
            if raw is None:
                return None
            try:
                stored = orjson.loads(raw)
                answer = validate_answer(stored["answer"])
                fetched_at = int(stored["fetched_at"])
            except (orjson.JSONDecodeError, MalformedAnswer, KeyError, TypeError) as exc:
                self._malformed(symbol, f"cached answer: {exc}")
                return None
        else:
            called = await self._call_api(symbol)
            if called is None:
                return None
            answer, fetched_at = called
        if is_unknown_symbol(answer):
            SOURCE_SKIPPED.labels(SOURCE, "unknown_symbol").inc()
            if symbol not in self._unknown:
                self._unknown.add(symbol)
                SOURCE_UNKNOWN_SYMBOLS.labels(SOURCE).inc()
                log.warning(
                    "Finnhub does not know this symbol (c=0, t=0); skipping it",
                    extra={"symbol": symbol, "source": SOURCE},
                )
            return None
        try:
            quote = to_quote(symbol, answer, fetched_at)
        except MalformedAnswer as exc:
            self._malformed(symbol, str(exc))
            return None
        if symbol in self._unknown:
            self._unknown.discard(symbol)
            log.info("symbol is known again", extra={"symbol": symbol, "source": SOURCE})
        if self._denied.pop(symbol, None) is not None:
            SOURCE_DENIED_SYMBOLS.labels(SOURCE).set(len(self._denied))
            log.info("the key has access to this symbol again", extra={"symbol": symbol})
        return quote

    @property
    def denied(self) -> frozenset[str]:
        """Configured symbols the key may not see (as of their last check)."""
        return frozenset(self._denied)

    def _deny(self, symbol: str, status: int, text: str) -> None:
        recheck = self._settings.denied_recheck_seconds
        if symbol not in self._denied:
            log.warning(
                "the Finnhub key has no access to this symbol (not in its plan); skipping it,"
                " the other symbols keep polling",
                extra={
                    "symbol": symbol,
                    "source": SOURCE,
                    "status": status,
                    "detail": redact(text, self._key)[:200],
                    "recheck_seconds": recheck,
                },
            )
        self._denied[symbol] = time.monotonic() + recheck
        SOURCE_DENIED_SYMBOLS.labels(SOURCE).set(len(self._denied))
        SOURCE_SKIPPED.labels(SOURCE, "no_access").inc()

    def _malformed(self, symbol: str, detail: str) -> None:
        SOURCE_SKIPPED.labels(SOURCE, "malformed").inc()
        log.warning(
            "malformed Finnhub quote answer, skipped for this poll",
            extra={"symbol": symbol, "source": SOURCE, "detail": redact(detail, self._key)[:300]},
        )

    async def _call_encoded(self, symbol: str) -> bytes | None:
        called = await self._call_api(symbol)
        if called is None:
            return None
        answer, fetched_at = called
        return orjson.dumps({"answer": answer, "fetched_at": fetched_at})

    async def _acquire(self) -> None:
        started = time.monotonic()
        await self._limiter.acquire()
        SOURCE_RATE_LIMIT_WAIT.labels(SOURCE).inc(time.monotonic() - started)

    async def _call_api(self, symbol: str) -> tuple[dict[str, Any], int] | None:
        """One logical API call with retries: (validated answer, fetched_at ms) or None."""
        settings = self._settings
        headers = {"X-Finnhub-Token": self._key.reveal()}
        retries = 0
        while True:
            await self._acquire()
            delay = 0.0
            detail = ""
            try:
                async with self._http().get(
                    self._url, params={"symbol": symbol}, headers=headers, timeout=self._timeout
                ) as resp:
                    status = resp.status
                    self._pace(resp.headers)
                    if status == 200:
                        body = await resp.read()
                        fetched_at = now_ms()
                        self._consecutive_429 = 0
                        self._key_works = True
                        try:
                            answer = validate_answer(orjson.loads(body))
                        except (orjson.JSONDecodeError, MalformedAnswer) as exc:
                            SOURCE_REQUESTS.labels(SOURCE, "malformed").inc()
                            excerpt = body[:120].decode("utf-8", "replace")
                            self._malformed(symbol, f"{exc}; body starts {excerpt!r}")
                            return None
                        outcome = "unknown_symbol" if is_unknown_symbol(answer) else "ok"
                        SOURCE_REQUESTS.labels(SOURCE, outcome).inc()
                        return answer, fetched_at
                    if status in (401, 403):
                        text = error_text(await resp.read())
                        kind = denial_kind(text)
                        if kind == "no_access" or (kind is None and self._key_works):
                            SOURCE_REQUESTS.labels(SOURCE, "no_access").inc()
                            self._deny(symbol, status, text)
                            return None
                        SOURCE_REQUESTS.labels(SOURCE, "auth_error").inc()
                        shown = redact(text, self._key)[:120]
                        raise FinnhubAuthError.rejected(
                            f"HTTP {status} from {self._path} ({shown!r})"
                        )
                    if status == 429:
                        reason = "rate_limited"
                        self._rate_limited(symbol, resp.headers.get("Retry-After"))
                    elif status >= 500:
                        self._consecutive_429 = 0
                        reason = "server_error"
                        detail = f"HTTP {status}"
                        delay = self._delay(retries)
                    else:
                        self._consecutive_429 = 0
                        SOURCE_REQUESTS.labels(SOURCE, "client_error").inc()
                        log.warning(
                            "Finnhub refused the quote request, skipped for this poll",
                            extra={"symbol": symbol, "status": status, "path": self._path},
                        )
                        return None
            except TimeoutError:
                reason = "timeout"
                detail = f"no answer within {settings.timeout_seconds}s"
                delay = self._delay(retries)
            except aiohttp.ClientError as exc:
                # aiohttp errors quote the URL; ours has no token, redact regardless.
                reason = "connection_error"
                detail = self._describe(exc)
                delay = self._delay(retries)
            SOURCE_REQUESTS.labels(SOURCE, reason).inc()
            if retries >= settings.max_retries:
                SOURCE_SKIPPED.labels(SOURCE, "failed").inc()
                log.warning(
                    "Finnhub quote call failed after retries, skipped for this poll",
                    extra={
                        "symbol": symbol,
                        "reason": reason,
                        "attempts": retries + 1,
                        "detail": detail,
                    },
                )
                return None
            retries += 1
            SOURCE_RETRIES.labels(SOURCE, reason).inc()
            log.info(
                "retrying Finnhub quote call",
                extra={
                    "symbol": symbol,
                    "reason": reason,
                    "attempt": retries,
                    "delay_seconds": round(delay, 3),
                    "detail": detail,
                },
            )
            if delay > 0:
                await asyncio.sleep(delay)

    def _pace(self, headers: Mapping[str, str]) -> None:
        """Spread the budget Finnhub says is left over the time until it resets."""
        try:
            remaining = int(headers["X-Ratelimit-Remaining"])
            reset = float(headers["X-Ratelimit-Reset"])
        except (KeyError, ValueError):
            return
        # Epoch seconds, as Finnhub sends it; a small number is read as seconds from now.
        left = reset - time.time() if reset > 1_000_000_000 else reset
        if not 0 < left <= MAX_RETRY_AFTER_SECONDS:
            return
        self._limiter.penalize(left if remaining <= 0 else left / (remaining + 1))

    def _rate_limited(self, symbol: str, retry_after_header: str | None) -> None:
        """HTTP 429: pause the shared limiter, so every call waits, not only this one."""
        self._consecutive_429 += 1
        SOURCE_RATE_LIMITED.labels(SOURCE).inc()
        retry_after = parse_retry_after(retry_after_header)
        pause = retry_after if retry_after is not None else self._delay(self._consecutive_429 - 1)
        self._limiter.penalize(pause)
        log.warning(
            "rate limited by Finnhub (HTTP 429), pausing all calls",
            extra={
                "symbol": symbol,
                "pause_seconds": round(pause, 3),
                "retry_after": retry_after_header is not None,
            },
        )

    # -- polling -----------------------------------------------------------------------------

    async def quotes(self) -> AsyncIterator[Quote]:
        """Poll every symbol once per FINNHUB_POLL_INTERVAL_SECONDS, forever; new quotes only.

        The symbols are spread evenly over the interval (one every interval/n seconds) rather
        than fired in a burst. If the budget cannot sustain the interval, the limiter stretches
        it (and a warning says so at start). Calls are sequential: quotes come out in poll order.
        """
        symbols = self._settings.symbols
        if not symbols:
            raise SettingsError("STOCK_SYMBOLS is empty: nothing to poll")
        interval = self._settings.poll_interval_seconds
        slot = interval / len(symbols)
        per_minute = len(symbols) * 60.0 / interval
        if per_minute > self._settings.calls_per_minute:
            log.warning(
                "polling every symbol each interval needs more calls than the budget allows;"
                " the effective interval will be longer",
                extra={
                    "symbols": len(symbols),
                    "poll_interval_seconds": interval,
                    "calls_per_minute_needed": round(per_minute, 1),
                    "calls_per_minute": self._settings.calls_per_minute,
                },
            )
        loop = asyncio.get_running_loop()
        try:
            next_at = loop.time()
            while True:
                for symbol in symbols:
                    delay = next_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    elif delay < -interval:
                        # Far behind (slow API, long 429 pause): restart the schedule instead
                        # of bursting to catch up.
                        next_at = loop.time()
                    next_at += slot
                    quote = await self.fetch(symbol)
                    if quote is None:
                        if self._denied.keys() >= set(symbols):
                            raise FinnhubNoAccess(
                                "the Finnhub API key has no access to any of STOCK_SYMBOLS"
                                f" ({', '.join(symbols)}): check the key's plan or the symbols"
                            )
                        continue
                    last = self._last_sent.get(symbol)
                    if last is not None and quote.market_timestamp <= last:
                        SOURCE_SKIPPED.labels(SOURCE, "unchanged").inc()
                        continue
                    self._last_sent[symbol] = quote.market_timestamp
                    if self._cache is not None and not await self._cache.claim(
                        symbol, quote.market_timestamp
                    ):
                        SOURCE_SKIPPED.labels(SOURCE, "sent_by_other_replica").inc()
                        continue
                    SOURCE_QUOTES.labels(SOURCE).inc()
                    yield quote
        finally:
            await self.close()
