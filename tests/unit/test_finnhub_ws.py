"""FinnhubTradeSource against the fake Finnhub websocket (real aiohttp websocket, no mocks):
subscriptions, several trades per message, pings and errors, garbage, drops, reconnection with
backoff and resubscription, bad keys, and that the token never leaks. Finnhub's limits: one
connection per key (a reconnect storm is detected and backed off from), the symbol cap, and
the socket lease's behaviour when Redis cannot be reached (the lease against a real Redis is
in tests/integration/test_finnhub_ws_lease.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import traceback
from collections.abc import AsyncIterator

import aiohttp
import pytest

from stockstream.contracts.quotes import Quote
from stockstream.logs import JsonFormatter, TextFormatter
from stockstream.metrics import REGISTRY
from stockstream.retry import Backoff
from stockstream.settings import CacheSettings, FinnhubSettings, Secret
from stockstream.sources.finnhub import socket_lease
from stockstream.sources.finnhub.api import FinnhubAuthError
from stockstream.sources.finnhub.socket_lease import SocketLease, lease_key
from stockstream.sources.finnhub.websocket import KEY_CONFLICT, FinnhubTradeSource
from tests.conftest import free_port
from tests.fakes import TOKEN, FakeFinnhub, trade

T0 = 1_767_623_400_000  # epoch ms, as the trades websocket sends them
SRC = "finnhub-trade"
SYMBOLS = ("AAPL", "MSFT", "BINANCE:BTCUSDT")


@pytest.fixture
async def fake() -> AsyncIterator[FakeFinnhub]:
    async with FakeFinnhub() as server:
        yield server


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def streaming(source: FinnhubTradeSource) -> AsyncIterator[list[Quote]]:
    got: list[Quote] = []

    async def run() -> None:
        async for quote in source.quotes():
            got.append(quote)

    task = asyncio.create_task(run())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def formatted_logs(caplog: pytest.LogCaptureFixture) -> str:
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    return "\n".join(
        json_fmt.format(r) + "\n" + text_fmt.format(r) + "\n" + repr(vars(r))
        for r in caplog.records
    )


async def test_subscribes_and_turns_every_trade_of_a_message_into_a_quote(
    fake: FakeFinnhub,
) -> None:
    source = FinnhubTradeSource(fake.settings(symbols=SYMBOLS))
    async with streaming(source) as got:
        client = await fake.wait_subscribed(SYMBOLS)
        assert client.received == [{"type": "subscribe", "symbol": s} for s in SYMBOLS]
        before = time.time_ns() // 1_000_000
        delivered = await fake.push_trades(
            [
                trade("AAPL", 190.51, T0, 120, ["1", "12"]),
                trade("MSFT", 410.02, T0 + 3, 0.5),
                trade("AAPL", 190.49, T0 + 7, 30),
                trade("BINANCE:BTCUSDT", 97_000.5, T0 + 9, 0.0021),
            ]
        )
        assert delivered == 4
        await fake.wait_until(lambda: len(got) == 4)
        after = time.time_ns() // 1_000_000
    assert [(q.symbol, q.current_price, q.market_timestamp, q.volume) for q in got] == [
        ("AAPL", 190.51, T0, 120.0),
        ("MSFT", 410.02, T0 + 3, 0.5),
        ("AAPL", 190.49, T0 + 7, 30.0),
        ("BINANCE:BTCUSDT", 97_000.5, T0 + 9, 0.0021),
    ]
    for quote in got:
        assert quote.source == SRC
        assert quote.fetched_at is not None and before <= quote.fetched_at <= after
        assert quote.change_amount is None and quote.day_high is None and quote.prev_close is None


async def test_pings_errors_and_garbage_are_counted_not_fatal(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    pings = metric("stockstream_source_messages_total", source=SRC, type="ping")
    errors = metric("stockstream_source_messages_total", source=SRC, type="error")
    garbage = metric("stockstream_source_messages_total", source=SRC, type="malformed")
    bad_trades = metric("stockstream_source_skipped_total", source=SRC, reason="malformed")
    source = FinnhubTradeSource(fake.settings(symbols=("AAPL",)))
    async with streaming(source) as got:
        await fake.wait_subscribed(["AAPL"])
        await fake.ping()
        await fake.send_ws({"type": "error", "msg": "Subscribing to too many symbols"})
        await fake.send_ws("this is not json")
        await fake.send_ws([1, 2])
        await fake.send_ws({"type": "trade", "data": "nope"})
        await fake.send_ws(
            {
                "type": "trade",
                "data": [
                    trade("AAPL", 0.0, T0),  # zero price
                    trade("AAPL", 190.0, T0 // 1000),  # seconds, not ms
                    {"p": 190.0, "t": T0},  # no symbol
                    "x",
                    trade("AAPL", 190.25, T0 + 1, 10),  # the one good trade
                ],
            }
        )
        await fake.wait_until(lambda: len(got) == 1)
        await fake.ping()
        await fake.wait_until(
            lambda: (
                metric("stockstream_source_messages_total", source=SRC, type="ping") == pings + 2
            )
        )
    assert got[0].current_price == 190.25 and got[0].market_timestamp == T0 + 1
    assert metric("stockstream_source_messages_total", source=SRC, type="error") == errors + 1
    assert metric("stockstream_source_messages_total", source=SRC, type="malformed") == (
        garbage + 3
    )
    assert metric("stockstream_source_skipped_total", source=SRC, reason="malformed") == (
        bad_trades + 4
    )
    assert "Subscribing to too many symbols" in formatted_logs(caplog)
    assert source.connections == 1  # none of it dropped the connection


@pytest.mark.parametrize("abort", [True, False], ids=["network-drop", "server-close"])
async def test_reconnects_and_resubscribes_after_a_drop(fake: FakeFinnhub, abort: bool) -> None:
    reconnects = metric("stockstream_source_reconnects_total", source=SRC)
    source = FinnhubTradeSource(fake.settings(symbols=SYMBOLS))
    async with streaming(source) as got:
        await fake.wait_subscribed(SYMBOLS)
        await fake.push_trades([trade("AAPL", 190.0, T0)])
        await fake.wait_until(lambda: len(got) == 1)
        assert await fake.drop_ws(abort=abort) == 1
        second = await fake.wait_subscribed(SYMBOLS, connections=2)
        assert second.received == [{"type": "subscribe", "symbol": s} for s in SYMBOLS]
        await fake.push_trades([trade("MSFT", 411.0, T0 + 5), trade("AAPL", 190.5, T0 + 6)])
        await fake.wait_until(lambda: len(got) == 3)
    assert [q.symbol for q in got] == ["AAPL", "MSFT", "AAPL"]
    assert source.connections == 2
    assert metric("stockstream_source_reconnects_total", source=SRC) == reconnects + 1


async def test_failed_reconnections_back_off_exponentially(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    fake.reject_ws(503, times=4)
    source = FinnhubTradeSource(
        fake.settings(backoff_initial_seconds=0.04, backoff_max_seconds=1.0)
    )
    async with streaming(source):
        await fake.wait_subscribed(["AAPL"], within=5.0)
    statuses = [status for _, status in fake.ws_handshakes]
    assert statuses == [503, 503, 503, 503, 101]
    times = [at for at, _ in fake.ws_handshakes]
    waits = [b - a for a, b in itertools.pairwise(times)]
    for k, wait in enumerate(waits):
        assert wait >= 0.04 * 2**k / 2 - 0.005, waits
    assert waits[3] > waits[0]
    # aiohttp's handshake error quotes the URL, token included: it must not reach the logs.
    assert caplog.records and TOKEN not in formatted_logs(caplog)


async def test_rejected_token_stops_the_source_without_showing_it(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "ws-secret-MUST-NOT-LEAK-77"
    source = FinnhubTradeSource(fake.settings(api_key=Secret(secret)))
    with pytest.raises(FinnhubAuthError) as raised:
        async for _ in source.quotes():
            pass
    assert fake.ws_handshakes[0][1] == 401 and len(fake.ws_handshakes) == 1
    message = "".join(traceback.format_exception(raised.value))
    assert "401" in message and "FINNHUB_API_KEY" in message
    for text in (message, repr(source), formatted_logs(caplog)):
        assert secret not in text


async def test_the_event_loop_stays_responsive_while_streaming(fake: FakeFinnhub) -> None:
    """Receiving, dropping and reconnecting never stall other coroutines."""
    source = FinnhubTradeSource(fake.settings(symbols=SYMBOLS))
    worst = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            worst = max(worst, now - last)
            last = now

    tick = asyncio.create_task(ticker())
    async with streaming(source) as got:
        await fake.wait_subscribed(SYMBOLS)
        for i in range(20):
            await fake.push_trades([trade(s, 100.0 + i, T0 + i) for s in SYMBOLS])
        await fake.wait_until(lambda: len(got) == 60)
        await asyncio.sleep(0.8)  # quiet: a blocking receive would hold the loop all along
        await fake.drop_ws()
        await fake.wait_subscribed(SYMBOLS, connections=2)
    stop.set()
    await tick
    assert worst < 0.5  # generous for busy CI machines, still well below the quiet period


# -- one connection per key: reconnect storms --------------------------------------------------


def reconnect_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        float(r.__dict__["delay_seconds"])
        for r in caplog.records
        if r.getMessage() == "Finnhub trades websocket lost, reconnecting"
    ]


async def test_the_fake_allows_one_connection_per_token(fake: FakeFinnhub) -> None:
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(fake.ws_url, params={"token": TOKEN})
        second = await http.ws_connect(fake.ws_url, params={"token": TOKEN})
        msg = await asyncio.wait_for(first.receive(), 2.0)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        await fake.wait_until(lambda: len(fake.open_clients) == 1)
        assert fake.open_clients[0].ws is not None and not second.closed
        assert fake.ws_kicked == 1 and fake.ws_max_open[TOKEN] == 2
        assert [c.kicked for c in fake.ws_clients] == [True, False]
        await first.close()
        await second.close()


async def test_another_client_on_the_key_is_reported_once_and_backed_off_from(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program keeps reconnecting with the same key: every connection of ours is
    closed right after it opens. One error line names the cause, and the reconnections slow
    down to the storm backoff instead of fighting over the socket every few milliseconds."""
    conflicts = metric("stockstream_source_ws_key_conflicts_total", source=SRC)
    shorts = metric("stockstream_source_ws_short_connections_total", source=SRC)
    stop = asyncio.Event()

    async def other_program() -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                async with http.ws_connect(fake.ws_url, params={"token": TOKEN}) as ws:
                    async for _ in ws:
                        pass
                await asyncio.sleep(0.02)

    source = FinnhubTradeSource(
        fake.settings(),
        short_connection_seconds=1.0,
        storm_after=3,
        storm_backoff=Backoff(0.4, 0.8),
    )
    rival = asyncio.create_task(other_program())
    try:
        async with streaming(source):
            await fake.wait_until(lambda: source.storms == 1, within=5.0)
            detected = len(reconnect_delays(caplog))
            await fake.wait_until(lambda: len(reconnect_delays(caplog)) >= detected + 3, 8.0)
    finally:
        stop.set()
        await fake.drop_ws()
        rival.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rival
    delays = reconnect_delays(caplog)
    assert all(d < 0.06 for d in delays[: detected - 1]), delays  # before: the usual backoff
    assert all(d >= 0.2 for d in delays[detected - 1 :]), delays  # from the 3rd: storm backoff
    storm_lines = [r for r in caplog.records if KEY_CONFLICT in r.getMessage()]
    assert len(storm_lines) == 1 and storm_lines[0].levelno == logging.ERROR
    assert source.storms == 1  # one storm, however long it lasts
    assert metric("stockstream_source_ws_key_conflicts_total", source=SRC) == conflicts + 1
    assert metric("stockstream_source_ws_short_connections_total", source=SRC) >= shorts + 5
    assert TOKEN not in formatted_logs(caplog)


async def test_drops_of_connections_that_lived_are_no_storm(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    shorts = metric("stockstream_source_ws_short_connections_total", source=SRC)
    source = FinnhubTradeSource(fake.settings(), short_connection_seconds=0.2, storm_after=2)
    async with streaming(source):
        for n in range(1, 4):
            await fake.wait_subscribed(["AAPL"], connections=n)
            await asyncio.sleep(0.3)
            await fake.drop_ws(abort=False)
        await fake.wait_subscribed(["AAPL"], connections=4)
    assert source.storms == 0
    assert metric("stockstream_source_ws_short_connections_total", source=SRC) == shorts
    assert not [r for r in caplog.records if KEY_CONFLICT in r.getMessage()]
    assert max(reconnect_delays(caplog)) < 0.06


# -- the symbol cap ----------------------------------------------------------------------------


async def test_symbols_beyond_ws_max_symbols_are_not_subscribed_and_named_once(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    symbols = ("AAPL", "MSFT", "TSLA", "GOOGL", "AMZN")
    source = FinnhubTradeSource(fake.settings(symbols=symbols, ws_max_symbols=3))
    assert metric("stockstream_source_ws_unsubscribed_symbols", source=SRC) == 2
    lines = [r for r in caplog.records if "not subscribed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert lines[0].__dict__["symbols"] == ["GOOGL", "AMZN"]
    async with streaming(source) as got:
        client = await fake.wait_subscribed(symbols[:3])
        await fake.push_trades([trade(s, 10.0, T0) for s in symbols])
        await fake.wait_until(lambda: len(got) == 3)
        await fake.drop_ws()
        second = await fake.wait_subscribed(symbols[:3], connections=2)
    assert client.received == [{"type": "subscribe", "symbol": s} for s in symbols[:3]]
    assert second.received == client.received
    assert len([r for r in caplog.records if "not subscribed" in r.getMessage()]) == 1
    FinnhubTradeSource(fake.settings(symbols=symbols))  # within the cap: the gauge drops
    assert metric("stockstream_source_ws_unsubscribed_symbols", source=SRC) == 0


async def test_refusals_beyond_finnhubs_real_cap_name_the_symbols_sent_last(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    """The fake caps at 50 like Finnhub; FINNHUB_WS_MAX_SYMBOLS set higher lets 5 through."""
    refused = metric("stockstream_source_ws_subscriptions_refused_total", source=SRC)
    symbols = tuple(f"S{i:02d}" for i in range(55))
    source = FinnhubTradeSource(fake.settings(symbols=symbols, ws_max_symbols=60))
    async with streaming(source) as got:
        client = await fake.wait_subscribed(symbols[:50])
        await fake.wait_until(
            lambda: (
                metric("stockstream_source_ws_subscriptions_refused_total", source=SRC)
                == refused + 5
            )
        )
        assert await fake.push_trades([trade("S49", 1.0, T0), trade("S50", 1.0, T0)]) == 1
        await fake.wait_until(lambda: len(got) == 1)
    assert client.subscribed == list(symbols[:50])
    lines = [r for r in caplog.records if "refused a subscription" in r.getMessage()]
    assert len(lines) == 5 and all(r.levelno == logging.ERROR for r in lines)
    assert lines[0].__dict__["likely_refused"] == ["S54"]
    assert lines[-1].__dict__["likely_refused"] == ["S50", "S51", "S52", "S53", "S54"]
    assert "at most 50" in lines[-1].__dict__["fix"]
    assert source.connections == 1  # refusals do not drop the connection


async def test_trades_without_conditions_zero_and_fractional_volume_come_through(
    fake: FakeFinnhub,
) -> None:
    """Crypto and forex trades carry `c: null`; volumes may be 0 or fractional."""
    entries = [
        trade("BINANCE:BTCUSDT", 97_000.5, T0, 0.0021, conditions=None),
        trade("OANDA:EUR_USD", 1.0841, T0 + 1, 0, conditions=None),
        trade("AAPL", 190.5, T0 + 2, 0.5, ["1", "12"]),
    ]
    symbols = ("BINANCE:BTCUSDT", "OANDA:EUR_USD", "AAPL")
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(fake.ws_url, params={"token": TOKEN}) as raw,
    ):
        for s in symbols:
            await raw.send_json({"type": "subscribe", "symbol": s})
        await fake.wait_subscribed(symbols)
        await fake.push_trades(entries)
        wire = await asyncio.wait_for(raw.receive_json(), 2.0)
    assert [(e["c"], e["v"]) for e in wire["data"]] == [
        (None, 0.0021),
        (None, 0),
        (["1", "12"], 0.5),
    ]
    source = FinnhubTradeSource(fake.settings(symbols=symbols))
    async with streaming(source) as got:
        await fake.wait_subscribed(symbols, connections=2)
        await fake.push_trades(entries)
        await fake.wait_until(lambda: len(got) == 3)
    assert [(q.symbol, q.volume) for q in got] == [
        ("BINANCE:BTCUSDT", 0.0021),
        ("OANDA:EUR_USD", 0.0),
        ("AAPL", 0.5),
    ]


# -- the socket lease without Redis ------------------------------------------------------------


def test_the_lease_key_is_a_hash_of_the_api_key_never_the_key() -> None:
    key = lease_key(Secret(TOKEN))
    assert key == lease_key(TOKEN) and key.startswith("stockstream:finnhub:ws-lease:")
    assert TOKEN not in key and TOKEN[:8] not in key
    assert lease_key("another-key") != key
    lease = SocketLease.from_url("redis://127.0.0.1:1/0", Secret(TOKEN), replica="pod-a")
    assert lease.token.startswith("pod-a/") and TOKEN not in lease.token + repr(lease)
    other = SocketLease.from_url("redis://127.0.0.1:1/0", Secret(TOKEN), replica="pod-a")
    assert other.token != lease.token  # random per replica
    no_redis = socket_lease.from_settings(FinnhubSettings(api_key=Secret(TOKEN)), CacheSettings())
    assert no_redis is None


async def test_without_redis_a_replica_waits_the_grace_then_connects_unleased(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis unreachable and no holder known: stand by for the grace period (a holder that
    is still streaming keeps its socket through a Redis restart), then connect without the
    lease rather than lose every trade."""
    unleased = metric("stockstream_source_ws_lease_total", outcome="unleased")
    password = "redis-pass-4f1d"
    lease = SocketLease.from_url(
        f"redis://:{password}@127.0.0.1:{free_port()}/0",  # nothing listens there
        Secret(TOKEN),
        lease_seconds=0.5,
        retry_seconds=0.05,
        unreachable_grace_seconds=0.6,
    )
    source = FinnhubTradeSource(fake.settings(), lease=lease)
    started = time.monotonic()
    async with streaming(source) as got:
        await fake.wait_subscribed(["AAPL"], within=5.0)
        waited = fake.ws_clients[0].opened_at - started
        await fake.push_trades([trade("AAPL", 190.0, T0)])
        await fake.wait_until(lambda: len(got) == 1)
        await asyncio.sleep(0.3)  # the keeper keeps failing: still one connection
        assert len(fake.ws_clients) == 1 and lease.held and not lease.leased
    await lease.close()
    assert 0.6 <= waited < 2.0, waited
    messages = [r.getMessage() for r in caplog.records]
    assert sum("without the socket lease" in m and "waiting" not in m for m in messages) == 1
    assert sum("waiting before connecting" in m for m in messages) == 1
    assert sum(m == "Redis unreachable for the Finnhub socket lease" for m in messages) == 1
    assert metric("stockstream_source_ws_lease_total", outcome="unleased") == unleased + 1
    logs = formatted_logs(caplog)
    assert password not in logs and TOKEN not in logs
