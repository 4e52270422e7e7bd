"""The live chart in a real browser: headless Chromium, driven over the Chrome DevTools
protocol (aiohttp's websocket client), loads `/chart/` from a real worker fed with quotes; the
candles appear, the open window shows as the forming candle, more windows close and appear
without a reload, and an anomaly shows as a marker. A screenshot is kept in the test's tmp dir
and as `build/chart.png`.

The page publishes what it draws as `window.__chartState`; the test reads it with
`Runtime.evaluate`. Anomalies are test records (`anomaly_record`), so the test does not depend
on the anomaly agent (turned off here)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stockstream.contracts.anomalies import AnomalyKind, anomaly_record
from stockstream.web.forming import default_partition
from tests.conftest import ROOT
from tests.integration.harness import Stack, Worker, create_topics, produce

pytestmark = pytest.mark.integration

MINUTE = 60_000
SYMBOLS = ("S000", "S001", "S002")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium with one page, over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.log = open(profile.parent / "chromium.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",  # tests run as root in CI containers
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "--window-size=1280,800",
                "about:blank",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self, within: float = 60.0) -> None:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + within
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self._ws.receive_json(), 60)
            if message.get("id") == ident:
                assert "error" not in message, message
                return dict(message["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        result = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def quotes(
    base_ms: int, minutes: range, per_minute: int = 6, symbols: tuple[str, ...] = SYMBOLS
) -> list[tuple[bytes, bytes, bool]]:
    """A rising-and-falling price per symbol, `per_minute` quotes in each minute, in time order."""
    rows = []
    for m in minutes:
        for q in range(per_minute):
            ts = base_ms + m * MINUTE + q * (MINUTE // per_minute) + 500
            for i, symbol in enumerate(symbols):
                price = round(100 + 10 * i + ((m * 7 + q * 3) % 11) - 5 + m * 0.2, 4)
                body = {
                    "symbol": symbol,
                    "current_price": price,
                    "market_timestamp": ts,
                    "source": "replay",
                    "volume": float(10 + (m * 13 + q) % 50),
                }
                rows.append((symbol.encode(), json.dumps(body).encode(), True))
    return rows


async def wait_for_state(
    browser: Browser, check: Callable[[dict[str, Any]], bool], what: str, within: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = await browser.evaluate("window.__chartState || null") or {}
        if state and check(state):
            return state
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: not seen within {within} s; last state {state}")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does)")
    chromium = Browser(tmp_path / "chromium-profile")
    try:
        await chromium.connect()
        yield chromium
    finally:
        await chromium.close()


async def test_the_live_chart_draws_and_updates_candles_in_a_browser(
    kafka_bootstrap: str, tmp_path: Path, browser: Browser
) -> None:
    stack = chart_stack(kafka_bootstrap, tmp_path / "data")
    anomalies_topic = stack.extra_env["KAFKA_ANOMALIES_TOPIC"]
    await create_topics(stack)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(anomalies_topic, stack.partitions, 1)])
    finally:
        await admin.close()
    # Event times of the last hour, so the chart's time axis reads like a live one.
    base = (int(time.time() * 1000) // MINUTE - 60) * MINUTE
    await produce(kafka_bootstrap, stack.quotes, quotes(base, range(30)))

    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        await browser.call("Page.enable")
        await browser.call(
            "Page.navigate", url=f"http://127.0.0.1:{worker.port}/chart/?symbol=S000"
        )

        first = await wait_for_state(
            browser,
            lambda s: s["closed"] >= 25 and s["forming"] >= 1 and s["formingHeld"] is True,
            "closed candles and the forming one",
        )
        assert first["symbol"] == "S000" and first["connected"]
        assert first["lastTime"] > first["lastClosedTime"]  # the forming candle is the newest
        await browser.evaluate("window.__sameDocument = true")
        # The page refreshes its symbol list every 5 s; a worker still catching up has not
        # reached every partition's symbols when the page first asks.
        deadline = time.monotonic() + 30
        while True:
            options = await browser.evaluate(
                "[...document.querySelectorAll('#symbol option')].map(o => o.value)"
            )
            if set(SYMBOLS) <= set(options) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert set(SYMBOLS) <= set(options)

        # More windows close: new candles without a reload.
        await produce(kafka_bootstrap, stack.quotes, quotes(base, range(30, 36)))
        later = await wait_for_state(
            browser,
            lambda s: (
                s["closed"] >= first["closed"] + 5
                and s["lastClosedTime"] >= first["lastClosedTime"] + 5 * 60
                and s["forming"] >= 1
            ),
            "candles of the windows closed later",
        )
        assert await browser.evaluate("window.__sameDocument === true")
        assert later["lastTime"] > later["lastClosedTime"] and later["updates"] > first["updates"]

        # An anomaly (a test record in the contract's format) becomes a marker.
        marked = base + 20 * MINUTE
        record = anomaly_record(
            symbol="S000",
            start_ms=marked,
            end_ms=marked + MINUTE,
            kind=AnomalyKind.RETURN,
            value=0.04,
            mean=0.0,
            stddev=0.01,
            threshold=3.0,
            history=20,
            close=101.0,
            volume=30.0,
            detected_at_ms=int(time.time() * 1000),
        )
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(anomalies_topic, json.dumps(record).encode(), key=b"S000")
        finally:
            await producer.stop()
        await wait_for_state(browser, lambda s: s["markers"] >= 1, "the anomaly marker")

        # The body's data attributes say the same as the state object.
        dataset = await browser.evaluate("Object.assign({}, document.body.dataset)")
        assert int(dataset["closed"]) >= later["closed"] and dataset["symbol"] == "S000"

        png = await browser.screenshot()
        assert png.startswith(b"\x89PNG")
        (tmp_path / "chart.png").write_bytes(png)
        (ROOT / "build").mkdir(exist_ok=True)
        (ROOT / "build" / "chart.png").write_bytes(png)

        # The same data as JSON, and the vendored library served by the worker itself.
        status, history = worker.get("/chart/history?symbol=S000")
        assert status == 200 and len(history["candles"]) >= later["closed"]
        assert [m["start_ms"] for m in history["markers"]] == [marked]
        status, body = worker.get("/chart/symbols")
        assert status == 200 and set(SYMBOLS) <= set(body["symbols"])
        status, _ = worker.get("/chart/history?symbol=")
        assert status == 400
        vendored = (
            ROOT / "stockstream/web/static/vendor/lightweight-charts.standalone.production.js"
        )
        url = f"http://127.0.0.1:{worker.port}/chart/vendor/{vendored.name}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            served = await response.read()
        assert hashlib.sha256(served).digest() == hashlib.sha256(vendored.read_bytes()).digest()
    finally:
        worker.stop()


def chart_stack(bootstrap: str, data_dir: Path) -> Stack:
    """A run with its own anomalies topic; open windows stay open (no idle flush), and the
    stages the chart does not need are off (the anomaly agent too: test records instead)."""
    stack = Stack(bootstrap, data_dir, idle_timeout=600)
    stack.extra_env.update(
        {
            "KAFKA_ANOMALIES_TOPIC": f"anomalies-{stack.run}",
            "ANOMALY_ENABLED": "false",
            "ARCHIVE_ENABLED": "false",
            "WAREHOUSE_ENABLED": "false",
        }
    )
    return stack


async def test_a_worker_shows_the_forming_candle_another_worker_holds(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two workers share the partitions: the stream of a symbol whose open windows live on
    the other worker carries them, fetched from that worker (its `/chart/forming`)."""
    stack = chart_stack(kafka_bootstrap, tmp_path / "data")
    symbols = tuple(f"S{i:03d}" for i in range(24))  # on every partition of 3
    await create_topics(stack)
    base = (int(time.time() * 1000) // MINUTE - 30) * MINUTE
    await produce(kafka_bootstrap, stack.quotes, quotes(base, range(10), symbols=symbols))
    first = Worker(stack, tmp_path / "worker-a.log")
    second = Worker(stack, tmp_path / "worker-b.log")
    try:
        first.wait_ready()
        second.wait_ready()
        deadline = time.monotonic() + 90
        while True:  # until the group has settled on sharing the partitions
            (status_a, ready_a), (status_b, ready_b) = first.get("/ready/"), second.get("/ready/")
            owned_b = set(ready_b.get("partitions", []))
            if status_a == status_b == 200 and ready_a["partitions"] and owned_b:
                break
            assert time.monotonic() < deadline, (ready_a, ready_b)
            await asyncio.sleep(0.5)
        symbol = next(s for s in symbols if default_partition(s, stack.partitions) in owned_b)
        # Quotes after the rebalance, as a live feed sends them: the new owner loads its
        # partitions when their records arrive.
        await produce(kafka_bootstrap, stack.quotes, quotes(base, range(10, 12), symbols=symbols))
        latest = base + 11 * MINUTE
        url = f"http://127.0.0.1:{first.port}/chart/events"
        seen: list[Any] = []
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session,
                session.get(url, params={"symbol": symbol}) as response,
            ):
                assert response.headers["Content-Type"] == "text/event-stream"
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    body = json.loads(line[6:])
                    seen.append(body)
                    if "held" in body and [c["start_ms"] for c in body["candles"]][-1:] == [latest]:
                        break
        except TimeoutError:
            owner = second.get(f"/chart/forming?symbol={symbol}")
            raise AssertionError(
                f"no forming candle of {symbol}: {seen[-2:]}; the owner answers {owner}"
            ) from None
        forming = seen[-1]
        assert forming["held"] is False, seen
        assert forming["owner"] == f"http://127.0.0.1:{second.port}"
        assert seen[0]["partition"] == default_partition(symbol, stack.partitions)
        # Its closed windows come from the shared topic, whichever worker emitted them.
        status, history = first.get(f"/chart/history?symbol={symbol}")
        assert status == 200 and history["candles"][-1]["start_ms"] >= base + 9 * MINUTE
    finally:
        first.stop()
        second.stop()
