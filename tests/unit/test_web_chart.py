"""The live chart without a broker: candles and markers, the bounded book, the fan-out (slow
clients dropped, others served), forming candles (local and from the owner), the event
stream over real HTTP, and the vendored library's files."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from stockstream.contracts.anomalies import AnomalyKind, anomaly_record
from stockstream.contracts.quotes import Quote
from stockstream.contracts.windows import parse_window, window_record
from stockstream.metrics import CHART_CLIENTS_DROPPED, CHART_RECORDS_SKIPPED
from stockstream.settings import Settings, load_settings
from stockstream.tables.window_state import WindowState
from stockstream.web import chart, live
from stockstream.web.candles import CandleBook, candle, check_symbol, forming_candles
from stockstream.web.forming import default_partition
from stockstream.web.live import ChartFeed, Subscriber, TooManyClients, sse_frame

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_623_400_000
MINUTE = 60_000


def window(symbol: str, start_ms: int, close: float = 101.0) -> dict[str, Any]:
    return window_record(
        symbol=symbol,
        start_ms=start_ms,
        end_ms=start_ms + MINUTE,
        count=3,
        total=300.0,
        low=99.0,
        high=102.0,
        open_price=100.0,
        close_price=close,
        volume=42.0,
        price_volume=4200.0,
        first_event_ms=start_ms + 1,
        last_event_ms=start_ms + 59_000,
    )


def anomaly(symbol: str, start_ms: int, kind: AnomalyKind = AnomalyKind.RETURN) -> dict[str, Any]:
    return anomaly_record(
        symbol=symbol,
        start_ms=start_ms,
        end_ms=start_ms + MINUTE,
        kind=kind,
        value=0.05,
        mean=0.0,
        stddev=0.01,
        threshold=3.0,
        history=30,
        close=105.0,
        volume=42.0,
        detected_at_ms=start_ms + MINUTE + 100,
    )


@pytest.fixture(name="settings")
def settings_fixture(tmp_path: Path) -> Settings:
    return load_settings(
        environ={
            "STOCKSTREAM_DATA_DIR": str(tmp_path),
            "KAFKA_PARTITIONS": "3",
            "KAFKA_AGGREGATED_TOPIC": "agg",
            "KAFKA_ANOMALIES_TOPIC": "anom",
        },
        dotenv_path=None,
    )


def open_state(symbol: str, partition: int, *starts: int) -> WindowState:
    state = WindowState({}, size_ms=MINUTE, grace_ms=5_000)
    windows = state.restore(partition)
    for offset, start in enumerate(starts):
        windows.apply(Quote(symbol, 10.0 + offset, start + 1_000, "replay", 5.0), offset)
    state.register(partition, windows)
    return state


def frames(subscriber: Subscriber) -> list[tuple[str, Any]]:
    """The queued frames as (event, payload); None for the end of the stream."""
    out: list[tuple[str, Any]] = []
    queue = subscriber._queue
    while not queue.empty():
        frame = queue.get_nowait()
        if frame is None:
            out.append(("end", None))
            continue
        match = re.fullmatch(rb"event: (\w+)\ndata: (.*)\n\n", frame, re.S)
        assert match, frame
        out.append((match[1].decode(), orjson.loads(match[2])))
    return out


# ---------------------------------------------------------------------- candles and the book


def test_a_window_record_becomes_a_candle_in_seconds() -> None:
    bar = candle(parse_window(window("AAPL", T0)))
    assert bar == {
        "time": T0 // 1000,
        "start_ms": T0,
        "open": 100.0,
        "high": 102.0,
        "low": 99.0,
        "close": 101.0,
        "volume": 42.0,
        "count": 3,
    }


def test_symbols_are_bounded_and_printable() -> None:
    assert check_symbol("BRK.B") == "BRK.B"
    assert check_symbol("FXCM:XAU/USD") == "FXCM:XAU/USD"
    for bad in (None, "", "x" * 65, "AAPL\n", 7, ["AAPL"]):
        assert check_symbol(bad) is None


def test_the_book_keeps_the_last_candles_of_each_symbol_in_order() -> None:
    book = CandleBook(history=5, markers=4, max_symbols=10)
    for i in (3, 1, 2, 0, 4, 5, 6, 7):  # out of order on purpose
        book.add_window(parse_window(window("AAPL", T0 + i * MINUTE)), partition=2)
    snap = book.snapshot("AAPL")
    assert [c["start_ms"] for c in snap["candles"]] == [T0 + i * MINUTE for i in range(3, 8)]
    assert snap["partition"] == 2
    # The same window again (a re-read) replaces, never duplicates.
    book.add_window(parse_window(window("AAPL", T0 + 7 * MINUTE, close=111.0)))
    snap = book.snapshot("AAPL")
    assert len(snap["candles"]) == 5 and snap["candles"][-1]["close"] == 111.0


def test_the_book_forgets_the_least_recently_updated_symbol() -> None:
    book = CandleBook(history=5, markers=4, max_symbols=2)
    book.add_window(parse_window(window("A", T0)))
    book.add_window(parse_window(window("B", T0)))
    book.add_window(parse_window(window("A", T0 + MINUTE)))
    book.add_window(parse_window(window("C", T0)))
    assert book.symbols() == ["A", "C"]
    assert book.snapshot("B")["candles"] == []


def test_anomalies_become_markers_once_and_only_on_candles_the_book_holds() -> None:
    book = CandleBook(history=3, markers=10, max_symbols=10)
    for i in range(5):
        book.add_window(parse_window(window("AAPL", T0 + i * MINUTE)))
    assert book.add_anomaly(anomaly("AAPL", T0 + 4 * MINUTE)) is not None
    assert book.add_anomaly(anomaly("AAPL", T0 + 4 * MINUTE)) is None  # repeated: known
    assert book.add_anomaly(anomaly("AAPL", T0 + 4 * MINUTE, AnomalyKind.VOLUME)) is not None
    assert book.add_anomaly(anomaly("AAPL", T0)) is not None  # its candle is gone
    markers = book.snapshot("AAPL")["markers"]
    assert [(m["start_ms"], m["kind"]) for m in markers] == [
        (T0 + 4 * MINUTE, "return"),
        (T0 + 4 * MINUTE, "volume"),
    ]
    assert markers[0]["z"] == pytest.approx(5.0)


def test_forming_candles_are_the_symbols_open_windows_oldest_first() -> None:
    state = open_state("AAPL", 1, T0 + MINUTE, T0)
    windows = state.loaded()[1]
    bars = forming_candles(windows.open.values(), "AAPL")
    assert [b["start_ms"] for b in bars] == [T0, T0 + MINUTE]
    assert forming_candles(windows.open.values(), "MSFT") == []


# ---------------------------------------------------------------------- fan-out


async def test_a_full_queue_drops_the_client_and_ends_its_stream() -> None:
    subscriber = Subscriber("AAPL", size=2)
    assert subscriber.offer(b"1") and subscriber.offer(b"2")
    assert not subscriber.offer(b"3")
    assert subscriber.dropped
    assert await subscriber.next() is None  # what was queued is cut: the stream ends now
    assert not subscriber.offer(b"4")


async def test_records_reach_streams_only_after_the_backfill(settings: Settings) -> None:
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: None)
    feed.ensure_running = lambda: None  # type: ignore[method-assign]  # no broker here
    aapl, msft = feed.subscribe("AAPL"), feed.subscribe("MSFT")
    first = frames(aapl)
    assert [name for name, _ in first] == ["snapshot"]
    assert first[0][1]["loading"] is True and first[0][1]["candles"] == []
    feed.ingest("agg", 1, 10, orjson.dumps(window("AAPL", T0)))
    assert frames(aapl) == []  # backfill: into the book only
    feed._caught_up()
    (name, snap), *_ = frames(aapl)
    assert name == "snapshot" and not snap["loading"] and len(snap["candles"]) == 1
    assert snap["partition"] == 1
    feed.ingest("agg", 1, 11, orjson.dumps(window("AAPL", T0 + MINUTE)))
    feed.ingest("anom", 1, 3, orjson.dumps(anomaly("AAPL", T0 + MINUTE)))
    feed.ingest("anom", 1, 4, orjson.dumps(anomaly("AAPL", T0 + MINUTE)))  # repeated
    got = frames(aapl)
    assert [name for name, _ in got] == ["candle", "anomaly"]
    assert got[0][1]["candle"]["start_ms"] == T0 + MINUTE
    assert got[1][1]["marker"]["kind"] == "return"
    # Other symbols: their snapshots (at subscribe, once caught up), none of AAPL's frames.
    assert [name for name, _ in frames(msft)] == ["snapshot", "snapshot"]


async def test_a_slow_client_is_dropped_while_the_others_get_every_frame(
    settings: Settings,
) -> None:
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: None)
    feed.ensure_running = lambda: None  # type: ignore[method-assign]
    feed._caught_up()
    slow, fast = feed.subscribe("AAPL"), feed.subscribe("AAPL")
    dropped = CHART_CLIENTS_DROPPED._value.get()
    received = 0
    for i in range(live.QUEUE_FRAMES + 5):
        feed.ingest("agg", 0, i, orjson.dumps(window("AAPL", T0 + i * MINUTE)))
        while not fast._queue.empty():  # the fast client keeps reading
            assert await fast.next() is not None
            received += 1
    assert slow.dropped and not fast.dropped
    assert received == live.QUEUE_FRAMES + 5 + 1  # + its snapshot
    assert CHART_CLIENTS_DROPPED._value.get() == dropped + 1
    assert await slow.next() is None
    feed.unsubscribe(slow)
    assert feed.clients == 1


async def test_unreadable_records_are_skipped_and_counted(settings: Settings) -> None:
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: None)
    before = CHART_RECORDS_SKIPPED.labels("agg")._value.get()
    hostile = [
        None,
        b"{not json",
        b"[" * 5000,
        orjson.dumps({"symbol": "AAPL"}),
        orjson.dumps({**window("AAPL", T0), "max": "1e400"}),
        b" " * (live.MAX_RECORD_BYTES + 1),
    ]
    for offset, value in enumerate(hostile):
        feed.ingest("agg", 0, offset, value)
    feed.ingest("anom", 0, 0, orjson.dumps({**anomaly("AAPL", T0), "stddev": 0}))
    assert CHART_RECORDS_SKIPPED.labels("agg")._value.get() == before + len(hostile)
    assert len(feed.book) == 0


async def test_streams_are_limited(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "MAX_CLIENTS", 2)
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: None)
    feed.ensure_running = lambda: None  # type: ignore[method-assign]
    feed.subscribe("A")
    feed.subscribe("B")
    with pytest.raises(TooManyClients):
        feed.subscribe("C")


# ---------------------------------------------------------------------- forming candles


async def test_forming_candles_of_a_partition_this_worker_holds(settings: Settings) -> None:
    partition = default_partition("AAPL", 3)
    feed = ChartFeed(settings, open_state("AAPL", partition, T0), lambda p: "http://unused")
    body = await feed.forming.fetch("AAPL")
    assert body["held"] and body["partition"] == partition and body["owner"] is None
    assert [c["start_ms"] for c in body["candles"]] == [T0]


async def owner_server(answer: Any) -> TestServer:
    async def forming(request: web.Request) -> web.Response:
        assert request.query["symbol"] == "AAPL"
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/chart/forming", forming)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_forming_candles_of_another_workers_partition_come_from_it(
    settings: Settings,
) -> None:
    owner_state = open_state("AAPL", default_partition("AAPL", 3), T0)
    owner_feed = ChartFeed(settings, owner_state, lambda p: None)
    server = await owner_server(owner_feed.forming.local("AAPL"))
    url = str(server.make_url("/"))
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: url)
    try:
        body = await feed.forming.fetch("AAPL")
        assert not body["held"] and body["owner"] == url and "error" not in body
        assert [c["start_ms"] for c in body["candles"]] == [T0]
        # Unknown owner: says so, closed candles only.
        feed.forming._owner = lambda p: None
        body = await feed.forming.fetch("AAPL")
        assert body["owner"] is None and body["candles"] == []
    finally:
        await feed.on_stop()
        await server.close()


async def test_a_hostile_owner_answer_is_refused(settings: Settings) -> None:
    bad = {"candles": [{"time": 1, "start_ms": 1000, "count": 1, "open": "x"}]}
    server = await owner_server(bad)
    url = str(server.make_url("/"))
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: url)
    try:
        body = await feed.forming.fetch("AAPL")
        assert body["candles"] == [] and body["error"].startswith("owner did not answer")
    finally:
        await feed.on_stop()
        await server.close()


# ---------------------------------------------------------------------- the event stream


async def test_the_event_stream_over_http(settings: Settings) -> None:
    feed = ChartFeed(settings, WindowState({}, MINUTE, 5_000), lambda p: None)
    feed.ensure_running = lambda: None  # type: ignore[method-assign]
    feed._caught_up()
    feed.ingest("agg", 2, 0, orjson.dumps(window("AAPL", T0)))

    async def events(request: web.Request) -> web.StreamResponse:
        return await chart.stream_events(request, feed, request.query["symbol"])

    app = web.Application()
    app.router.add_get("/chart/events", events)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/chart/events", params={"symbol": "AAPL"})
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await response.content.readuntil(b"\n\n") == b"retry: 2000\n\n"
        snapshot = await response.content.readuntil(b"\n\n")
        assert snapshot.startswith(b"event: snapshot\n")
        assert orjson.loads(snapshot.split(b"data: ", 1)[1])["candles"][0]["start_ms"] == T0
        feed.ingest("agg", 2, 1, orjson.dumps(window("AAPL", T0 + MINUTE)))
        frame = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert frame.startswith(b"event: candle\n")
        assert feed.clients == 1
        feed.close_streams()  # what the web server's shutdown does
        assert await asyncio.wait_for(response.content.read(), 5) == b""
    assert feed.clients == 0


def test_sse_frames_are_one_event_each() -> None:
    frame = sse_frame("candle", {"text": "a\nb"})
    assert frame == b'event: candle\ndata: {"text":"a\\nb"}\n\n'


# ---------------------------------------------------------------------- the page's files


def test_every_served_file_exists_and_the_page_uses_only_served_files() -> None:
    for path, content_type in chart.FILES.values():
        assert path.is_file() and path.stat().st_size > 0, path
        assert content_type
    html = (chart.STATIC / "chart.html").read_text()
    for src in re.findall(r'(?:src|href)="(/chart/[^"]+)"', html):
        _, _, folder, name = src.split("/", 3)
        assert (folder, name) in chart.FILES, src


def test_the_vendored_build_is_the_recorded_one() -> None:
    vendor = chart.STATIC / "vendor"
    recorded = (vendor / "VENDORED.md").read_text()
    script = (ROOT / "scripts" / "vendor_chart.sh").read_text()
    build = (vendor / "lightweight-charts.standalone.production.js").read_bytes()
    sha = hashlib.sha256(build).hexdigest()
    assert f"`{sha}`" in recorded
    assert f"RECORDED_SHA256={sha}" in script
    version = re.search(r"^RECORDED_VERSION=(\S+)$", script, re.M)
    assert version and f"| version | {version[1]} |" in recorded
    assert f"Lightweight Charts™ v{version[1]}" in build[:300].decode()
    assert "Apache License" in (vendor / "LICENSE").read_text()
    assert "TradingView, Inc." in (vendor / "NOTICE").read_text()


def test_the_build_ships_the_chart_files() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert (
        '"stockstream.web" = ["static/*.html", "static/*.js", "static/*.css", "static/vendor/*"]'
        in (pyproject)
    )
