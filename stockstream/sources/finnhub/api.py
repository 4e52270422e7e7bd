"""What the REST and the websocket client share about Finnhub's API: its payloads, its errors,
its key, and the HTTP session both talk through.

- `validate_answer`, `is_unknown_symbol`, `to_quote`: a `GET /quote` answer. Mapping:
  {c, d, dp, h, l, o, pc, t} -> Quote(current_price=c, change_amount=d, change_percent=dp,
  day_high=h, day_low=l, day_open=o, prev_close=pc, market_timestamp=t*1000 (Finnhub's `t` is
  epoch seconds), fetched_at=when the API answered (ms), volume=None). `d`/`dp` may be absent
  (answers recorded before Finnhub added them): None.
- `trade_to_quote`: one entry {s, p, t, v, c} of a websocket trade message's `data` ->
  Quote(current_price=p, market_timestamp=t (already epoch ms), volume=v, conditions=c (null
  for crypto and forex), the day fields None).
- `parse_retry_after`: the `Retry-After` of an HTTP 429.
- `redact`: the key must never reach a log, and aiohttp errors quote the URL it may be in.
- `FinnhubClient`: the base of both sources: the key check, the backoff policy and an aiohttp
  session that is either the caller's (left open) or the client's own (closed by `close()`).
"""

from __future__ import annotations

import math
import random
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any, Self
from urllib.parse import quote as url_quote

import aiohttp
import orjson

from stockstream.contracts.quotes import CONDITION_MAX_LENGTH, MAX_CONDITIONS, Quote, Source
from stockstream.errors import StockstreamError
from stockstream.retry import Backoff
from stockstream.settings import FinnhubSettings, Secret

FIELDS = ("c", "d", "dp", "h", "l", "o", "pc", "t")
# Answers recorded before Finnhub added the day's change (and replays of them) lack these.
_OPTIONAL_FIELDS = frozenset(("d", "dp"))
# A Retry-After beyond this is treated as this (a broken header must not stop polling for days).
MAX_RETRY_AFTER_SECONDS = 600.0
# Finnhub's `t` is epoch seconds; anything this large is already milliseconds (or garbage).
_MAX_EPOCH_SECONDS = 100_000_000_000
# Trades carry epoch milliseconds; below this a `t` is seconds (or garbage).
_MIN_EPOCH_MS = 100_000_000_000
_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&;])token=)[^&#\s'\"]*", re.IGNORECASE)
_KEY_SETTING = "FINNHUB_API_KEY (or FINNHUB_API_KEY_FILE)"


class FinnhubAuthError(StockstreamError, RuntimeError):
    """The API key is missing or Finnhub rejected it (HTTP 401/403). Stops the source.

    The message names the variable to fix and the URL path, never the key.
    """

    @classmethod
    def rejected(cls, what: str) -> FinnhubAuthError:
        """Finnhub refused the key; `what` says where (status, path), never the key."""
        return cls(f"Finnhub rejected the API key: {what}; check {_KEY_SETTING}")


class FinnhubNoAccess(FinnhubAuthError):
    """The key is valid but may see none of the configured symbols. Stops the source."""


# What Finnhub's 401/403 bodies say (recorded: tests/data/finnhub/recorded.json). A bad key
# stops the source; a symbol outside the key's plan only stops that symbol.
_KEY_REJECTED = ("invalid api key", "use an api key", "sign up", "api key")
_NO_ACCESS = ("access to this resource", "subscription required", "premium", "not supported")


def error_text(body: bytes) -> str:
    """The message of an error answer: the JSON `error` field, or the body as text."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])[:300]
    return body[:300].decode("utf-8", "replace").strip()


def denial_kind(text: str) -> str | None:
    """`"no_access"` when an error message says the symbol is outside the key's plan, `"key"`
    when it says the key itself is bad, None when it says neither."""
    lowered = text.lower()
    if any(marker in lowered for marker in _NO_ACCESS):
        return "no_access"
    if any(marker in lowered for marker in _KEY_REJECTED):
        return "key"
    return None


class MalformedAnswer(StockstreamError, ValueError):
    """An API answer that is not the documented shape."""


class MalformedTrade(StockstreamError, ValueError):
    """A websocket trade entry that is not the documented shape."""


def redact(text: str, secret: Secret | str) -> str:
    """`text` with the secret (plain or URL-encoded) and any `token=` query value masked."""
    value = secret.reveal() if isinstance(secret, Secret) else secret
    if value:
        for form in {value, url_quote(value, safe="")}:
            text = text.replace(form, "***")
    return _TOKEN_IN_QUERY.sub(r"\1***", text)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_number(value: Any) -> bool:
    # bool is an int subclass: `true` is not a price.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_answer(data: Any) -> dict[str, Any]:
    """The quote fields of a parsed /quote answer; raises MalformedAnswer."""
    if not isinstance(data, dict):
        raise MalformedAnswer(f"expected a JSON object, got {type(data).__name__}")
    missing = [name for name in FIELDS if name not in data and name not in _OPTIONAL_FIELDS]
    if missing:
        raise MalformedAnswer(f"missing field(s) {', '.join(missing)}")
    data = {name: data.get(name) for name in FIELDS}
    for name in ("c", "t"):
        if not _is_number(data[name]):
            raise MalformedAnswer(f"field {name} must be a number, got {data[name]!r:.40}")
    for name in ("d", "dp", "h", "l", "o", "pc"):
        if data[name] is not None and not _is_number(data[name]):
            raise MalformedAnswer(f"field {name} must be a number or null, got {data[name]!r:.40}")
    t = data["t"]
    if t < 0 or (isinstance(t, float) and not t.is_integer()) or t >= _MAX_EPOCH_SECONDS:
        raise MalformedAnswer(f"field t must be whole epoch seconds, got {t!r}")
    return {name: data[name] for name in FIELDS}


def is_unknown_symbol(answer: dict[str, Any]) -> bool:
    """Finnhub's answer for a symbol it does not know: c=0, t=0 (d and dp null)."""
    return bool(answer["c"] == 0 and answer["t"] == 0)


def to_quote(symbol: str, answer: dict[str, Any], fetched_at: int) -> Quote:
    """A validated, known-symbol answer as a `Quote`; raises MalformedAnswer if unusable."""
    if answer["c"] <= 0:
        raise MalformedAnswer(f"current price must be > 0, got {answer['c']!r}")
    if answer["t"] == 0:
        raise MalformedAnswer("t=0 with a non-zero price")
    high, low = answer["h"], answer["l"]
    if high is not None and low is not None and high < low:
        raise MalformedAnswer(f"day high {high} < day low {low}")

    def opt(name: str) -> float | None:
        value = answer[name]
        return None if value is None else float(value)

    return Quote(
        symbol=symbol,
        current_price=float(answer["c"]),
        market_timestamp=int(answer["t"]) * 1000,
        source=Source.FINNHUB_QUOTE.value,
        volume=None,
        fetched_at=fetched_at,
        change_amount=opt("d"),
        change_percent=opt("dp"),
        day_high=opt("h"),
        day_low=opt("l"),
        day_open=opt("o"),
        prev_close=opt("pc"),
    )


def trade_to_quote(trade: Any, fetched_at: int) -> Quote:
    """One entry of a trade message's `data`; raises MalformedTrade."""
    if not isinstance(trade, dict):
        raise MalformedTrade(f"trade must be an object, got {type(trade).__name__}")
    symbol: Any = trade.get("s")
    price: Any = trade.get("p")
    ts: Any = trade.get("t")
    volume: Any = trade.get("v")
    if not isinstance(symbol, str) or not symbol:
        raise MalformedTrade("missing or non-string s")
    if not _is_number(price) or price <= 0:
        raise MalformedTrade(f"p must be a number > 0, got {price!r:.40}")
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < _MIN_EPOCH_MS:
        raise MalformedTrade(f"t must be epoch milliseconds, got {ts!r:.40}")
    if volume is not None and not (_is_number(volume) and volume >= 0):
        raise MalformedTrade(f"v must be a number >= 0, got {volume!r:.40}")
    conditions: Any = trade.get("c")
    if conditions is not None and not (
        isinstance(conditions, list)
        and len(conditions) <= MAX_CONDITIONS
        and all(
            isinstance(code, str) and 0 < len(code) <= CONDITION_MAX_LENGTH for code in conditions
        )
    ):
        raise MalformedTrade(f"c must be a list of condition codes or null, got {conditions!r:.60}")
    return Quote(
        symbol=symbol,
        current_price=float(price),
        market_timestamp=ts,
        source=Source.FINNHUB_TRADE.value,
        volume=None if volume is None else float(volume),
        fetched_at=fetched_at,
        # An empty list and null both mean "no condition reported".
        conditions=tuple(conditions) if conditions else None,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


class FinnhubClient:
    """A Finnhub client with a key, the project's backoff policy and an aiohttp session.

    A session passed in is the caller's and `close()` leaves it open; without one the client
    makes its own on first use, closes it in `close()`, and makes a new one if it is used
    again after that (a source can be iterated again after it was closed).
    """

    def __init__(
        self,
        settings: FinnhubSettings,
        *,
        session: aiohttp.ClientSession | None,
        rng: random.Random | None,
    ) -> None:
        if not settings.api_key:
            raise FinnhubAuthError(f"no Finnhub API key: set {_KEY_SETTING}")
        self._settings = settings
        self._key = settings.api_key
        self._session = session
        self._owns_session = session is None
        self._rng = rng or random.Random()
        # load_settings refuses an initial above the maximum; settings built in code are capped
        # the way the backoff always treated them ("wait the maximum").
        maximum = settings.backoff_max_seconds
        self._backoff = Backoff(min(settings.backoff_initial_seconds, maximum), maximum)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it (a given session is the caller's)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    def _delay(self, retry: int) -> float:
        """The pause before retry number `retry` (0-based) of whatever failed."""
        return self._backoff.delay(retry, self._rng)

    def _describe(self, exc: BaseException) -> str:
        # aiohttp errors quote the URL, which may carry the token.
        return redact(f"{type(exc).__name__}: {exc}", self._key)
