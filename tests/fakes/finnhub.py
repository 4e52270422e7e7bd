"""A local fake of Finnhub: the REST quote endpoint and the trades websocket, with faults.

It speaks the documented API on 127.0.0.1 (a free port), so the real sources run against it
unchanged, through their real aiohttp client code:

- `GET /api/v1/quote?symbol=S` with the key as `token=` query parameter or `X-Finnhub-Token`
  header (HTTP 401 `{"error": "Invalid API key."}` without it or with a wrong one). A symbol
  outside the key's plan (`deny`) answers 403 (or 401) `{"error": "You don't have access to
  this resource."}`; 429s carry Finnhub's JSON or plain-text body; with `rate_limit` set,
  answers carry `X-Ratelimit-*` headers; `set_legacy_quote` answers without `d`/`dp`. A symbol set
  with `set_quote` answers `{c, d, dp, h, l, o, pc, t}` (`t` in epoch seconds, like Finnhub);
  any other symbol answers like Finnhub does for an unknown one:
  `{"c": 0, "d": null, "dp": null, "h": 0, "l": 0, "o": 0, "pc": 0, "t": 0}`.
- the trades websocket at `/` (`ws_url`, `?token=`; handshake refused with HTTP 401 without
  the right token): records `subscribe`/`unsubscribe` messages; `push_trades`, `ping`,
  `send_ws` and `drop_ws` drive it from the test. Unkind like Finnhub: one connection per
  token (a new one gets the older ones closed: `ws_kicked`, `ws_max_open` counts concurrent
  connections per token; `one_ws_per_token=False` lifts it) and at most `ws_max_symbols`
  (50) subscriptions per connection (each one beyond is answered
  `{"type": "error", "msg": "Subscribing to too many symbols"}` and gets nothing).
  `trade(..., conditions=None)` sends `"c": null` like crypto and forex trades.

Usage::

    async with FakeFinnhub() as fake:
        fake.set_quote("AAPL", 190.5, t=1_767_623_400)
        settings = fake.settings(symbols=("AAPL", "MSFT"), max_retries=2)
        fake.script(Fault.error(500), Fault.rate_limited(retry_after=0.2))  # the next 2 calls
        quote = await FinnhubQuoteSource(settings).fetch("AAPL")
        assert [r.status for r in fake.requests] == [500, 429, 200]

Faults (`Fault.error`, `Fault.rate_limited`, `Fault.slow`, `Fault.malformed`, `Fault.answer`)
are queued with `script(*faults, symbol=None)` and each is consumed by the next authorised
quote request (of `symbol`, if given). `requests` records every quote request: receive time
(`time.monotonic()`), symbol, status answered, how the key came (`header`, `query`, `missing`,
`wrong`) and the fault applied; `max_calls_in(window)` checks a rate budget against it.
With `auto_advance=True` every answer for a known symbol moves its `t` one second on (and its
price a cent), so a poller always gets a new quote: handy to feed a broker in integration
tests. `wait_until(predicate, within=...)` and `wait_subscribed(...)` poll the fake's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from stockstream.settings import FinnhubSettings, Secret

TOKEN = "fake-finnhub-key-7c1e0b9a"
UNKNOWN_ANSWER = {"c": 0, "d": None, "dp": None, "h": 0, "l": 0, "o": 0, "pc": 0, "t": 0}
# Bodies as the real API sends them (tests/data/finnhub/recorded.json).
INVALID_KEY = {"error": "Invalid API key."}
NO_ACCESS = {"error": "You don't have access to this resource."}
LIMIT_REACHED = "API limit reached. Please try again later. Remaining Limit: 0"


@dataclass(frozen=True)
class Fault:
    """How to answer one quote request instead of (or before) the normal answer."""

    status: int = 200
    body: bytes | None = None  # None: the normal answer (status 200) or {"error": ...}
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering

    @classmethod
    def error(cls, status: int = 500) -> Fault:
        return cls(status=status)

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = None, *, text: bool = False) -> Fault:
        """HTTP 429, with `Retry-After: <retry_after>` when given; the body is Finnhub's JSON
        `{"error": "API limit reached..."}`, or the same message as plain text (`text`), both
        recorded from the real API."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        body = LIMIT_REACHED.encode() if text else json.dumps({"error": LIMIT_REACHED}).encode()
        return cls(status=429, headers=headers, body=body)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """The normal answer, `seconds` late (longer than the client timeout = a timeout)."""
        return cls(delay=seconds)

    @classmethod
    def malformed(cls, body: bytes = b'{"c": 190.5, "t": 17676') -> Fault:
        """HTTP 200 with `body` (default: truncated JSON)."""
        return cls(body=body)

    @classmethod
    def answer(cls, payload: Any, status: int = 200) -> Fault:
        """Any JSON value as the answer (e.g. a list, or an object missing fields)."""
        return cls(status=status, body=json.dumps(payload).encode())


@dataclass
class QuoteRequest:
    at: float  # time.monotonic() when the request arrived
    symbol: str | None
    auth: str  # "header", "query", "missing" or "wrong"
    status: int = 0  # what the fake answered; 0 = none (the client went away first: timeout)
    fault: Fault | None = None


@dataclass
class WsClient:
    """One websocket connection, in connection order (`FakeFinnhub.ws_clients`)."""

    ws: web.WebSocketResponse
    request: web.Request
    subscribed: list[str] = field(default_factory=list)  # current subscriptions, in order
    received: list[Any] = field(default_factory=list)  # every message the client sent
    closed: bool = False
    token: str = ""
    opened_at: float = 0.0  # time.monotonic() when the handshake completed
    closed_at: float | None = None  # time.monotonic() when the connection ended
    kicked: bool = False  # closed by the fake because a newer connection used its token


def max_in_window(times: Iterable[float], window: float) -> int:
    """The largest number of `times` that fall in any half-open interval of `window` seconds."""
    stamps = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(stamps):
        while at - stamps[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def trade(
    symbol: str,
    price: float,
    t_ms: int,
    volume: float = 100.0,
    conditions: Iterable[str] | None = (),
) -> dict[str, Any]:
    """One entry of a trade message, as Finnhub sends it: `conditions=None` is `"c": null`
    (crypto, forex); a volume may be 0 or fractional."""
    codes = None if conditions is None else list(conditions)
    return {"s": symbol, "p": price, "t": t_ms, "v": volume, "c": codes}


class FakeFinnhub:
    def __init__(
        self,
        *,
        token: str = TOKEN,
        auto_advance: bool = False,
        ws_max_symbols: int = 50,
        one_ws_per_token: bool = True,
    ) -> None:
        self.token = token
        self.ws_max_symbols = ws_max_symbols
        self.one_ws_per_token = one_ws_per_token
        self.ws_open: dict[str, int] = {}  # token -> connections open now
        self.ws_max_open: dict[str, int] = {}  # token -> most connections open at once
        self.ws_kicked = 0  # connections closed because a newer one used the same token
        self._kicks: set[asyncio.Task[Any]] = set()
        self.auto_advance = auto_advance
        self.quotes: dict[str, dict[str, Any]] = {}
        self.requests: list[QuoteRequest] = []
        self.ws_clients: list[WsClient] = []
        self.ws_handshakes: list[tuple[float, int]] = []  # (monotonic time, status answered)
        self._faults: list[tuple[str | None, Fault]] = []
        self._ws_rejects: list[int] = []
        self.denied: dict[str, int] = {}  # symbol -> 401 or 403 with Finnhub's "no access"
        # (limit per window, window seconds): answers carry X-Ratelimit-* headers when set.
        self.rate_limit: tuple[int, float] | None = None
        self._window_start = 0.0
        self._window_calls = 0
        self.over_limit = 0  # calls beyond `rate_limit` in their window
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeFinnhub:
        app = web.Application()
        app.router.add_get("/api/v1/quote", self._quote)
        app.router.add_get("/", self._websocket)
        # handler_cancellation: a client that timed out must not leave a handler sleeping
        # until shutdown; shutdown_timeout: stopping never waits long for stragglers.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._kicks:
            await asyncio.wait(self._kicks, timeout=2.0)
        for client in self.ws_clients:
            if not client.ws.closed:
                with contextlib.suppress(Exception):
                    await client.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeFinnhub:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def settings(self, **overrides: Any) -> FinnhubSettings:
        """FinnhubSettings pointing at this fake, with the right key and test-speed timings."""
        values: dict[str, Any] = {
            "api_key": Secret(self.token),
            "base_url": self.base_url,
            "ws_url": self.ws_url,
            "symbols": ("AAPL",),
            "poll_interval_seconds": 0.2,
            "calls_per_minute": 6000,
            "max_calls_per_second": 1000,
            "timeout_seconds": 0.5,
            "max_retries": 3,
            "backoff_initial_seconds": 0.01,
            "backoff_max_seconds": 0.05,
        }
        values.update(overrides)
        return FinnhubSettings(**values)

    # -- REST state and faults ---------------------------------------------------------------

    def set_quote(
        self,
        symbol: str,
        price: float,
        *,
        t: int | None = None,
        prev_close: float | None = None,
        high: float | None = None,
        low: float | None = None,
        open: float | None = None,
    ) -> dict[str, Any]:
        """Make `symbol` known with this quote (`t` epoch seconds, default now)."""
        pc = prev_close if prev_close is not None else round(price * 0.99, 2)
        change = round(price - pc, 4)
        self.quotes[symbol] = {
            "c": price,
            "d": change,
            "dp": round(100 * change / pc, 4) if pc else None,
            "h": high if high is not None else round(price * 1.01, 2),
            "l": low if low is not None else round(price * 0.98, 2),
            "o": open if open is not None else pc,
            "pc": pc,
            "t": int(time.time()) if t is None else t,
        }
        return self.quotes[symbol]

    def advance(self, symbol: str, *, seconds: int = 1, price: float | None = None) -> None:
        """Move a known symbol's quote `seconds` on (and its price, by a cent by default)."""
        q = self.quotes[symbol]
        q["t"] += seconds
        q["c"] = price if price is not None else round(q["c"] + 0.01, 2)
        q["h"], q["l"] = max(q["h"], q["c"]), min(q["l"], q["c"])
        q["d"] = round(q["c"] - q["pc"], 4)
        q["dp"] = round(100 * q["d"] / q["pc"], 4) if q["pc"] else None

    def deny(self, symbol: str, status: int = 403) -> None:
        """The key may not see `symbol` (outside its plan): Finnhub answers 403, some days 401,
        with `{"error": "You don't have access to this resource."}`."""
        self.denied[symbol] = status

    def set_legacy_quote(self, symbol: str, price: float, *, t: int | None = None) -> None:
        """A quote shaped like answers recorded before Finnhub added `d`/`dp`."""
        quote = self.set_quote(symbol, price, t=t)
        del quote["d"], quote["dp"]

    def forget(self, symbol: str) -> None:
        """Make `symbol` unknown again (answers c=0, t=0)."""
        self.quotes.pop(symbol, None)

    def script(self, *faults: Fault, symbol: str | None = None) -> None:
        """Queue faults, each consumed by the next authorised quote request (for `symbol`)."""
        self._faults.extend((symbol, fault) for fault in faults)

    def calls(self, symbol: str | None = None, status: int | None = None) -> list[QuoteRequest]:
        """Recorded quote requests, optionally only of `symbol` and/or answered `status`."""
        return [
            r
            for r in self.requests
            if (symbol is None or r.symbol == symbol) and (status is None or r.status == status)
        ]

    def max_calls_in(self, window: float, symbol: str | None = None) -> int:
        """Most quote requests received in any `window` seconds (to assert a rate budget)."""
        return max_in_window((r.at for r in self.calls(symbol)), window)

    def _next_fault(self, symbol: str | None) -> Fault | None:
        for i, (wanted, fault) in enumerate(self._faults):
            if wanted is None or wanted == symbol:
                del self._faults[i]
                return fault
        return None

    def _auth(self, request: web.Request) -> str:
        header = request.headers.get("X-Finnhub-Token")
        query = request.query.get("token")
        given, via = (header, "header") if header is not None else (query, "query")
        if given is None:
            return "missing"
        return via if given == self.token else "wrong"

    async def _quote(self, request: web.Request) -> web.StreamResponse:
        symbol = request.query.get("symbol")
        record = QuoteRequest(at=time.monotonic(), symbol=symbol, auth=self._auth(request))
        self.requests.append(record)
        response = await self._quote_response(record, symbol)
        record.status = response.status
        return response

    async def _quote_response(self, record: QuoteRequest, symbol: str | None) -> web.Response:
        if record.auth in ("missing", "wrong"):
            return web.json_response(INVALID_KEY, status=401)
        headers = self._rate_limit_headers()
        fault = record.fault = self._next_fault(symbol)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.body is not None:
                return web.Response(
                    body=fault.body,
                    status=fault.status,
                    headers=fault.headers,
                    content_type=(
                        "application/json" if fault.body[:1] in (b"{", b"[") else "text/plain"
                    ),
                )
            if fault.status != 200:
                return web.json_response(
                    {"error": f"fake fault {fault.status}"},
                    status=fault.status,
                    headers=fault.headers,
                )
        if not symbol:
            return web.json_response({"error": "Wrong symbol"}, status=422)
        if symbol in self.denied:
            return web.json_response(NO_ACCESS, status=self.denied[symbol], headers=headers)
        if symbol not in self.quotes:
            return web.json_response(UNKNOWN_ANSWER, headers=headers)
        if self.auto_advance and "d" in self.quotes[symbol]:
            self.advance(symbol)
        return web.json_response(self.quotes[symbol], headers=headers)

    def _rate_limit_headers(self) -> dict[str, str]:
        """X-Ratelimit-Limit/-Remaining/-Reset (epoch seconds) of a fixed window, if enabled."""
        if self.rate_limit is None:
            return {}
        limit, window = self.rate_limit
        now = time.time()
        if now >= self._window_start + window:
            self._window_start, self._window_calls = now, 0
        self._window_calls += 1
        if self._window_calls > limit:
            self.over_limit += 1
        return {
            "X-Ratelimit-Limit": str(limit),
            "X-Ratelimit-Remaining": str(max(0, limit - self._window_calls)),
            "X-Ratelimit-Reset": str(int(self._window_start + window) + 1),
        }

    # -- websocket ---------------------------------------------------------------------------

    def reject_ws(self, status: int = 503, times: int = 1) -> None:
        """Refuse the next `times` websocket handshakes with HTTP `status`."""
        self._ws_rejects.extend([status] * times)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("token") != self.token:
            self.ws_handshakes.append((time.monotonic(), 401))
            return web.json_response({"error": "Invalid API key"}, status=401)
        if self._ws_rejects:
            status = self._ws_rejects.pop(0)
            self.ws_handshakes.append((time.monotonic(), status))
            return web.json_response({"error": "fake handshake fault"}, status=status)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        token = request.query["token"]
        self.ws_handshakes.append((time.monotonic(), 101))
        client = WsClient(ws=ws, request=request, token=token, opened_at=time.monotonic())
        self.ws_clients.append(client)
        self.ws_open[token] = self.ws_open.get(token, 0) + 1
        self.ws_max_open[token] = max(self.ws_max_open.get(token, 0), self.ws_open[token])
        if self.one_ws_per_token:
            # Finnhub drops the older connection of a key within about a second; the close
            # code it uses is not documented, so a plain one.
            for older in self.open_clients:
                if older is not client and older.token == token:
                    older.kicked = True
                    self.ws_kicked += 1
                    kick = asyncio.create_task(older.ws.close(code=1000, message=b"replaced"))
                    self._kicks.add(kick)
                    kick.add_done_callback(self._kicks.discard)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    data = msg.data
                client.received.append(data)
                kind = data.get("type") if isinstance(data, dict) else None
                symbol = data.get("symbol") if isinstance(data, dict) else None
                if kind == "subscribe" and isinstance(symbol, str):
                    if symbol in client.subscribed:
                        continue
                    if len(client.subscribed) >= self.ws_max_symbols:
                        await ws.send_json(
                            {"type": "error", "msg": "Subscribing to too many symbols"}
                        )
                    else:
                        client.subscribed.append(symbol)
                elif kind == "unsubscribe" and isinstance(symbol, str):
                    if symbol in client.subscribed:
                        client.subscribed.remove(symbol)
                else:
                    await ws.send_json({"type": "error", "msg": "Invalid message"})
        finally:
            client.closed = True
            client.closed_at = time.monotonic()
            self.ws_open[token] -= 1
        return ws

    @property
    def open_clients(self) -> list[WsClient]:
        return [c for c in self.ws_clients if not c.closed and not c.ws.closed]

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Poll `predicate` until true; AssertionError after `within` seconds."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {within}s")
            await asyncio.sleep(0.01)

    async def wait_subscribed(
        self, symbols: Iterable[str], *, connections: int = 1, within: float = 5.0
    ) -> WsClient:
        """Wait for the `connections`-th connection to be open and subscribed to `symbols`."""
        wanted = set(symbols)

        def ready() -> bool:
            if len(self.ws_clients) < connections:
                return False
            client = self.ws_clients[connections - 1]
            return not client.closed and wanted <= set(client.subscribed)

        await self.wait_until(ready, within)
        return self.ws_clients[connections - 1]

    async def push_trades(self, trades: Iterable[Mapping[str, Any]]) -> int:
        """Send the trades, as one message per open client, to the clients subscribed to their
        symbol (like Finnhub). Returns the number of trades delivered."""
        trades = list(trades)
        delivered = 0
        for client in self.open_clients:
            mine = [dict(t) for t in trades if t["s"] in client.subscribed]
            if mine:
                await client.ws.send_json({"type": "trade", "data": mine})
                delivered += len(mine)
        return delivered

    async def ping(self) -> None:
        """Finnhub's application-level keep-alive message to every open client."""
        await self.send_ws({"type": "ping"})

    async def send_ws(self, message: Any) -> None:
        """Any message to every open client: a str as is, anything else as JSON."""
        for client in self.open_clients:
            if isinstance(message, str):
                await client.ws.send_str(message)
            else:
                await client.ws.send_json(message)

    async def drop_ws(self, *, abort: bool = True) -> int:
        """Drop every open websocket: `abort` cuts the TCP connection (no close frame, like a
        network failure); otherwise a clean close (code 1001, going away). Returns how many."""
        dropped = 0
        for client in self.open_clients:
            dropped += 1
            if abort and client.request.transport is not None:
                client.request.transport.abort()
                client.closed = True
            else:
                await client.ws.close(code=1001, message=b"going away")
        return dropped
