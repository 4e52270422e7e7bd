"""FinnhubQuoteSource against the local fake Finnhub (real HTTP through aiohttp, no mocks):
mapping, retries and backoff, 429 handling, the rate budget, unknown/unchanged/malformed
answers, bad keys, and that the key never leaks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import traceback
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client import generate_latest

from stockstream.contracts.quotes import Quote
from stockstream.logs import JsonFormatter, TextFormatter
from stockstream.metrics import REGISTRY
from stockstream.settings import Secret
from stockstream.sources.finnhub.api import (
    MAX_RETRY_AFTER_SECONDS,
    FinnhubAuthError,
    FinnhubNoAccess,
    MalformedAnswer,
    parse_retry_after,
    redact,
    validate_answer,
)
from stockstream.sources.finnhub.rest import FinnhubQuoteSource
from tests.conftest import free_port
from tests.fakes import TOKEN, FakeFinnhub, Fault

T0 = 1_767_623_400  # 2026-01-05T14:30:00Z, epoch seconds as Finnhub sends them
SRC = "finnhub-quote"


@pytest.fixture
async def fake() -> AsyncIterator[FakeFinnhub]:
    async with FakeFinnhub() as server:
        yield server


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def polling(source: FinnhubQuoteSource) -> AsyncIterator[list[Quote]]:
    """Run `source.quotes()` in the background; the list fills with what it yields."""
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
            await task  # re-raises what the source raised, if anything


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def formatted_logs(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as our JSON and text formatters print it (extras included)."""
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    return "\n".join(
        json_fmt.format(r) + "\n" + text_fmt.format(r) + "\n" + repr(vars(r))
        for r in caplog.records
    )


# -- mapping -----------------------------------------------------------------------------------


async def test_maps_every_field_and_converts_seconds_to_milliseconds(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0, prev_close=188.0, high=191.2, low=187.9, open=188.4)
    source = FinnhubQuoteSource(fake.settings())
    before = time.time_ns() // 1_000_000
    quote = await source.fetch("AAPL")
    after = time.time_ns() // 1_000_000
    await source.close()
    assert quote is not None
    assert quote == Quote(
        symbol="AAPL",
        current_price=190.5,
        market_timestamp=T0 * 1000,  # seconds -> epoch ms
        source=SRC,
        volume=None,
        fetched_at=quote.fetched_at,
        change_amount=2.5,
        change_percent=round(100 * 2.5 / 188.0, 4),
        day_high=191.2,
        day_low=187.9,
        day_open=188.4,
        prev_close=188.0,
    )
    assert quote.fetched_at is not None and before <= quote.fetched_at <= after
    # The key went in the X-Finnhub-Token header, never in the URL.
    assert [r.auth for r in fake.requests] == ["header"]


# -- retries -----------------------------------------------------------------------------------


async def test_5xx_is_retried_with_growing_backoff(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(Fault.error(500), Fault.error(502), Fault.error(503))
    retries = metric("stockstream_source_retries_total", source=SRC, reason="server_error")
    source = FinnhubQuoteSource(
        fake.settings(backoff_initial_seconds=0.04, backoff_max_seconds=1.0, max_retries=3)
    )
    quote = await source.fetch("AAPL")
    await source.close()
    assert quote is not None and quote.current_price == 190.5
    assert [r.status for r in fake.requests] == [500, 502, 503, 200]
    waits = gaps([r.at for r in fake.requests])
    # Equal jitter: retry k waits between half and all of 0.04 * 2**k.
    for k, wait in enumerate(waits):
        assert wait >= 0.04 * 2**k / 2 - 0.005, waits
    assert waits[2] > waits[0]
    assert metric("stockstream_source_retries_total", source=SRC, reason="server_error") == (
        retries + 3
    )


async def test_gives_up_after_max_retries_and_the_next_call_works(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(*[Fault.error(500)] * 3)
    failed = metric("stockstream_source_skipped_total", source=SRC, reason="failed")
    source = FinnhubQuoteSource(fake.settings(max_retries=2))
    assert await source.fetch("AAPL") is None
    assert len(fake.requests) == 3  # 1 call + 2 retries
    assert metric("stockstream_source_skipped_total", source=SRC, reason="failed") == failed + 1
    assert await source.fetch("AAPL") is not None
    await source.close()


async def test_timeout_is_retried(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(Fault.slow(2.0))
    source = FinnhubQuoteSource(fake.settings(timeout_seconds=0.2))
    started = time.monotonic()
    quote = await source.fetch("AAPL")
    await source.close()
    assert quote is not None
    assert time.monotonic() - started >= 0.2
    # The first request got no answer (the client gave up), the retry did.
    assert [r.status for r in fake.requests] == [0, 200]


async def test_other_4xx_is_skipped_without_retry(fake: FakeFinnhub) -> None:
    fake.script(Fault.error(404))
    source = FinnhubQuoteSource(fake.settings())
    assert await source.fetch("AAPL") is None
    await source.close()
    assert len(fake.requests) == 1


async def test_connection_refused_is_retried_then_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeFinnhub() as fake:
        settings = fake.settings(base_url=f"http://127.0.0.1:{free_port()}/api/v1", max_retries=2)
    source = FinnhubQuoteSource(settings)
    assert await source.fetch("AAPL") is None
    await source.close()
    failures = [r for r in caplog.records if getattr(r, "reason", "") == "connection_error"]
    assert len(failures) == 3
    assert TOKEN not in formatted_logs(caplog)


# -- HTTP 429 ----------------------------------------------------------------------------------


async def test_429_retry_after_is_honoured_and_pauses_other_symbols(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.set_quote("MSFT", 410.0, t=T0)
    fake.script(Fault.rate_limited(retry_after=0.4), symbol="AAPL")
    limited = metric("stockstream_source_rate_limited_total", source=SRC)
    source = FinnhubQuoteSource(fake.settings())
    aapl = asyncio.create_task(source.fetch("AAPL"))
    await fake.wait_until(lambda: source.limiter.paused_for() > 0)
    msft = await source.fetch("MSFT")  # another symbol, after the 429: must wait as well
    assert msft is not None and await aapl is not None
    await source.close()
    first, retry = fake.calls("AAPL")
    assert first.status == 429 and retry.status == 200
    assert retry.at - first.at >= 0.4 - 0.01
    assert fake.calls("MSFT")[0].at - first.at >= 0.4 - 0.01
    assert metric("stockstream_source_rate_limited_total", source=SRC) == limited + 1


async def test_429_without_retry_after_backs_off_exponentially(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(*[Fault.rate_limited()] * 3)
    source = FinnhubQuoteSource(
        # Steps long enough that a loaded machine's scheduling delay cannot reorder them.
        fake.settings(backoff_initial_seconds=0.2, backoff_max_seconds=2.0, max_retries=4)
    )
    assert await source.fetch("AAPL") is not None
    await source.close()
    assert [r.status for r in fake.requests] == [429, 429, 429, 200]
    waits = gaps([r.at for r in fake.requests])
    for k, wait in enumerate(waits):
        assert wait >= 0.2 * 2**k / 2 - 0.005, waits
    assert waits[2] > waits[0]


# -- the budget --------------------------------------------------------------------------------


async def test_rate_budget_is_respected_per_second_and_per_minute() -> None:
    """7 calls/min, 5 calls/s, 3 symbols polled as fast as the poll interval allows: the
    server sees at most 5 calls in any second and, within the same minute, no 8th call."""
    async with FakeFinnhub(auto_advance=True) as fake:
        for i, symbol in enumerate(("AAPL", "MSFT", "TSLA")):
            fake.set_quote(symbol, 100.0 + i, t=T0)
        settings = fake.settings(
            symbols=("AAPL", "MSFT", "TSLA"),
            poll_interval_seconds=0.03,
            calls_per_minute=7,
            max_calls_per_second=5,
        )
        source = FinnhubQuoteSource(settings)
        async with polling(source) as got:
            await fake.wait_until(lambda: len(fake.requests) >= 7)
            # Without the minute budget the 8th call would follow the 7th at once.
            await asyncio.sleep(0.3)
        assert len(fake.requests) == 7
        assert fake.max_calls_in(1.0) <= 5
        times = [r.at for r in fake.requests]
        assert times[5] - times[0] >= 1.0  # the 6th call waited for the first second to pass
        assert len(got) == 7  # every answer was new (auto_advance)


async def test_symbols_are_spread_over_the_poll_interval() -> None:
    symbols = ("AAPL", "MSFT", "TSLA", "AMZN")
    async with FakeFinnhub(auto_advance=True) as fake:
        for symbol in symbols:
            fake.set_quote(symbol, 100.0, t=T0)
        source = FinnhubQuoteSource(fake.settings(symbols=symbols, poll_interval_seconds=0.4))
        started = time.monotonic()
        async with polling(source):
            await fake.wait_until(lambda: len(fake.requests) >= 5)
        assert [r.symbol for r in fake.requests[:5]] == [*symbols, "AAPL"]
        # Call i is never early for its slot (i * interval / 4): no burst at the interval start.
        offsets = [r.at - started for r in fake.requests[:5]]
        assert all(offset >= i * 0.1 - 0.005 for i, offset in enumerate(offsets)), offsets
        assert offsets[4] < 0.4 + 0.3  # ...and every symbol comes back once per interval


# -- what is (not) sent ------------------------------------------------------------------------


async def test_unknown_symbol_is_reported_once_and_skipped(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    fake.auto_advance = True
    fake.set_quote("AAPL", 190.5, t=T0)
    unknown = metric("stockstream_source_unknown_symbols_total", source=SRC)
    source = FinnhubQuoteSource(fake.settings(symbols=("AAPL", "NOPE"), poll_interval_seconds=0.04))
    async with polling(source) as got:
        await fake.wait_until(lambda: len(fake.calls("NOPE")) >= 4)
    assert got and {q.symbol for q in got} == {"AAPL"}
    assert all(q.current_price > 0 for q in got)
    reports = [r for r in caplog.records if getattr(r, "symbol", None) == "NOPE"]
    assert len(reports) == 1 and reports[0].levelno == logging.WARNING
    assert metric("stockstream_source_unknown_symbols_total", source=SRC) == unknown + 1


async def test_unchanged_quote_is_not_sent_again(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    unchanged = metric("stockstream_source_skipped_total", source=SRC, reason="unchanged")
    source = FinnhubQuoteSource(fake.settings(poll_interval_seconds=0.03))
    async with polling(source) as got:
        await fake.wait_until(lambda: len(fake.requests) >= 4)
        assert [q.market_timestamp for q in got] == [T0 * 1000]
        fake.advance("AAPL", seconds=2, price=191.0)
        await fake.wait_until(lambda: len(got) >= 2)
        fake.set_quote("AAPL", 189.0, t=T0 + 1)  # older than the last sent: not sent either
        calls = len(fake.requests)
        await fake.wait_until(lambda: len(fake.requests) >= calls + 3)
    assert [(q.market_timestamp, q.current_price) for q in got] == [
        (T0 * 1000, 190.5),
        ((T0 + 2) * 1000, 191.0),
    ]
    assert metric("stockstream_source_skipped_total", source=SRC, reason="unchanged") >= (
        unchanged + 5
    )


async def test_malformed_answers_are_skipped_and_polling_goes_on(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    good = fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(
        Fault.malformed(),  # truncated JSON
        Fault.answer([1, 2, 3]),  # not an object
        Fault.answer({k: v for k, v in good.items() if k != "t"}),  # missing field
        Fault.answer({**good, "c": "190.5"}),  # wrong type
        Fault.malformed(b'{"c": NaN, "d": 1, "dp": 1, "h": 1, "l": 1, "o": 1, "pc": 1, "t": 1}'),
        Fault.answer({**good, "c": -3.0}),  # a non-positive price never goes out
        Fault.answer({**good, "t": T0 * 1000}),  # milliseconds where seconds are documented
    )
    malformed = metric("stockstream_source_skipped_total", source=SRC, reason="malformed")
    source = FinnhubQuoteSource(fake.settings(poll_interval_seconds=0.02))
    async with polling(source) as got:
        await fake.wait_until(lambda: len(got) >= 1)
    assert got[0].current_price == 190.5 and got[0].market_timestamp == T0 * 1000
    assert [r.status for r in fake.requests[:8]] == [200] * 8
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 7
    assert metric("stockstream_source_skipped_total", source=SRC, reason="malformed") == (
        malformed + 7
    )


# -- the key -----------------------------------------------------------------------------------


async def test_rejected_key_stops_the_source_without_showing_the_key(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-live-THIS-MUST-NOT-LEAK-42"
    source = FinnhubQuoteSource(fake.settings(api_key=Secret(secret)))
    with pytest.raises(FinnhubAuthError) as raised:
        await source.fetch("AAPL")
    assert len(fake.requests) == 1 and fake.requests[0].status == 401  # not retried
    message = "".join(traceback.format_exception(raised.value))
    assert "401" in message and "FINNHUB_API_KEY" in message
    with pytest.raises(FinnhubAuthError):
        async with polling(source):
            await fake.wait_until(lambda: len(fake.requests) >= 2)
            await asyncio.sleep(0.05)
    for text in (message, repr(source), formatted_logs(caplog)):
        assert secret not in text


async def test_a_403_that_names_neither_before_the_key_worked_is_a_key_error(
    fake: FakeFinnhub,
) -> None:
    fake.script(Fault.error(403))
    source = FinnhubQuoteSource(fake.settings())
    with pytest.raises(FinnhubAuthError, match="403"):
        await source.fetch("AAPL")
    await source.close()


async def test_the_real_invalid_key_answer_stops_the_source_and_says_so(fake: FakeFinnhub) -> None:
    source = FinnhubQuoteSource(fake.settings(api_key=Secret("not-the-key")))
    with pytest.raises(FinnhubAuthError) as raised:
        await source.fetch("AAPL")
    await source.close()
    assert "Invalid API key." in str(raised.value) and "FINNHUB_API_KEY" in str(raised.value)


# -- entitlements: a symbol outside the key's plan ---------------------------------------------


async def test_a_symbol_outside_the_plan_is_skipped_once_reported_and_the_rest_keep_polling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with FakeFinnhub(auto_advance=True) as fake:
        for symbol in ("AAPL", "OANDA:EUR_USD", "BINANCE:BTCUSDT"):
            fake.set_quote(symbol, 100.0, t=T0)
        fake.deny("SBIN.NS", 403)
        fake.deny("MOWI.OL", 401)  # Finnhub answers some days 401 for the same thing
        symbols = ("AAPL", "SBIN.NS", "OANDA:EUR_USD", "MOWI.OL", "BINANCE:BTCUSDT")
        skipped = metric("stockstream_source_skipped_total", source=SRC, reason="no_access")
        source = FinnhubQuoteSource(fake.settings(symbols=symbols, poll_interval_seconds=0.1))
        async with polling(source) as got:
            await fake.wait_until(lambda: len(fake.calls("AAPL")) >= 4)
        assert {q.symbol for q in got} == {"AAPL", "OANDA:EUR_USD", "BINANCE:BTCUSDT"}
        # Asked once, then left alone until the re-check (an hour by default).
        assert len(fake.calls("SBIN.NS")) == 1 and len(fake.calls("MOWI.OL")) == 1
        assert source.denied == {"SBIN.NS", "MOWI.OL"}
    assert metric("stockstream_source_denied_symbols", source=SRC) == 2
    assert metric("stockstream_source_skipped_total", source=SRC, reason="no_access") > skipped + 2
    warned = [r for r in caplog.records if "no access to this symbol" in r.getMessage()]
    assert sorted(r.__dict__["symbol"] for r in warned) == ["MOWI.OL", "SBIN.NS"]  # once each


async def test_a_denied_symbol_is_asked_again_and_comes_back(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.0, t=T0)
    fake.deny("SBIN.NS")
    source = FinnhubQuoteSource(fake.settings(denied_recheck_seconds=0.2))
    assert await source.fetch("SBIN.NS") is None
    assert await source.fetch("SBIN.NS") is None  # within the re-check: not asked
    assert len(fake.calls("SBIN.NS")) == 1
    del fake.denied["SBIN.NS"]
    fake.set_quote("SBIN.NS", 800.0, t=T0)
    await asyncio.sleep(0.25)
    quote = await source.fetch("SBIN.NS")
    await source.close()
    assert quote is not None and quote.current_price == 800.0
    assert source.denied == frozenset()
    assert metric("stockstream_source_denied_symbols", source=SRC) == 0


async def test_an_unrecognised_403_after_the_key_worked_only_skips_that_symbol(
    fake: FakeFinnhub,
) -> None:
    fake.set_quote("AAPL", 190.0, t=T0)
    source = FinnhubQuoteSource(fake.settings())
    assert await source.fetch("AAPL") is not None  # the key works
    fake.script(Fault.answer({"error": "Market data subscription required."}, status=403))
    fake.script(Fault.error(403))
    assert await source.fetch("^GSPC") is None
    assert await source.fetch("OANDA:XAU_USD") is None
    await source.close()
    assert source.denied == {"^GSPC", "OANDA:XAU_USD"}


async def test_a_key_that_may_see_none_of_the_symbols_stops_with_a_clear_message(
    fake: FakeFinnhub,
) -> None:
    for symbol in ("SBIN.NS", "SBERP.ME"):
        fake.deny(symbol)
    source = FinnhubQuoteSource(fake.settings(symbols=("SBIN.NS", "SBERP.ME")))
    with pytest.raises(FinnhubNoAccess, match="no access to any of STOCK_SYMBOLS") as raised:
        async with polling(source):
            await fake.wait_until(lambda: len(fake.requests) >= 2)
            await asyncio.sleep(0.1)
    assert "SBIN.NS, SBERP.ME" in str(raised.value)


# -- answers as the real API gives them --------------------------------------------------------


async def test_an_answer_without_d_and_dp_is_a_quote_not_malformed(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fake.set_legacy_quote("AAPL", 112.28, t=1_601_197_570)
    source = FinnhubQuoteSource(fake.settings())
    quote = await source.fetch("AAPL")
    await source.close()
    assert quote is not None and quote.current_price == 112.28
    assert quote.change_amount is None and quote.change_percent is None
    assert not [r for r in caplog.records if "malformed" in r.getMessage()]


@pytest.mark.parametrize("text", [False, True], ids=["json-body", "plain-text-body"])
async def test_both_429_bodies_pause_and_retry(fake: FakeFinnhub, text: bool) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(Fault.rate_limited(retry_after=0.1, text=text))
    source = FinnhubQuoteSource(fake.settings())
    assert await source.fetch("AAPL") is not None
    await source.close()
    assert [r.status for r in fake.requests] == [429, 200]


async def test_remaining_calls_headers_pace_the_requests(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.rate_limit = (2, 1.0)  # 2 calls per 1-second window, announced in the headers
    source = FinnhubQuoteSource(fake.settings())
    started = time.monotonic()
    for _ in range(5):
        assert await source.fetch("AAPL") is not None
    await source.close()
    assert fake.over_limit == 0  # never more calls in a window than the headers allowed
    assert time.monotonic() - started >= 1.0


def test_missing_key_is_refused_up_front() -> None:
    with pytest.raises(FinnhubAuthError, match="FINNHUB_API_KEY"):
        FinnhubQuoteSource(FakeFinnhub().settings(api_key=Secret("")))


async def test_key_never_appears_in_logs_metrics_or_repr(
    fake: FakeFinnhub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.set_quote("AAPL", 190.5, t=T0)
    fake.script(
        Fault.error(500),
        Fault.slow(1.0),
        Fault.rate_limited(),
        Fault.rate_limited(retry_after=0.01),
        Fault.malformed(f'{{"echo": "{TOKEN}"'.encode()),  # even a body quoting the key
        Fault.error(404),
    )
    source = FinnhubQuoteSource(fake.settings(timeout_seconds=0.2, max_retries=5))
    for _ in range(4):
        await source.fetch("AAPL")
    await source.close()
    assert {r.auth for r in fake.requests} == {"header"}
    assert caplog.records
    assert TOKEN not in formatted_logs(caplog)
    assert TOKEN not in generate_latest(REGISTRY).decode()
    assert TOKEN not in repr(source) and TOKEN not in repr(fake.settings())


# -- sessions ----------------------------------------------------------------------------------


async def test_own_session_is_closed_and_a_given_one_is_left_open(fake: FakeFinnhub) -> None:
    fake.set_quote("AAPL", 190.5, t=T0)
    own = FinnhubQuoteSource(fake.settings())
    stream = cast(AsyncGenerator[Quote, None], own.quotes())
    assert (await anext(stream)).symbol == "AAPL"
    session = own._session
    await stream.aclose()
    assert session is not None and session.closed

    async with aiohttp.ClientSession() as given:
        source = FinnhubQuoteSource(fake.settings(), session=given)
        stream = cast(AsyncGenerator[Quote, None], source.quotes())
        assert (await anext(stream)).symbol == "AAPL"
        await stream.aclose()
        assert not given.closed


# -- pure helpers ------------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER_SECONDS
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    retry = parse_retry_after(later)
    assert retry is not None and 25 <= retry <= 31


def test_redact() -> None:
    key = "abc/123+key"
    text = f"GET wss://ws.finnhub.io/?token={key}&x=1 and abc%2F123%2Bkey and {key}"
    shown = redact(text, Secret(key))
    assert key not in shown and "abc%2F123%2Bkey" not in shown
    assert "token=***&x=1" in shown
    assert redact("url?token=other-key", Secret(key)) == "url?token=***"


def test_validate_answer() -> None:
    answer = {"c": 1.0, "d": None, "dp": None, "h": 1.0, "l": 1.0, "o": 1.0, "pc": 1.0, "t": 5}
    assert validate_answer(answer) == answer
    legacy = {k: v for k, v in answer.items() if k not in ("d", "dp")}
    assert validate_answer(legacy) == answer
    bad: Any
    for bad in ([], {**answer, "t": True}, {**answer, "h": "1"}, {**answer, "t": 1.5}):
        with pytest.raises(MalformedAnswer):
            validate_answer(bad)
