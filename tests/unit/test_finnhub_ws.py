"""FinnhubTradeSource against the fake Finnhub websocket (real aiohttp websocket, no mocks):
subscriptions, several trades per message, pings and errors, garbage, drops, reconnection with
backoff and resubscription, bad keys, and that the token never leaks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import traceback
from collections.abc import AsyncIterator

import pytest

from stockstream.contracts.quotes import Quote
from stockstream.logs import JsonFormatter, TextFormatter
from stockstream.metrics import REGISTRY
from stockstream.settings import Secret
from stockstream.sources.finnhub.api import FinnhubAuthError
from stockstream.sources.finnhub.websocket import FinnhubTradeSource
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
