"""The inspection pages without a broker: the recent-window ring, the JSON builders, the HTML
(escaping hostile symbols), and the routing between two workers (two real aiohttp servers
whose `Cluster`s point at each other)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from stockstream.agents.aggregate.emitter import WindowEmitter
from stockstream.contracts.quotes import Quote, QuoteValidator
from stockstream.settings import KafkaSettings, WorkerSettings
from stockstream.tables.window_state import WindowState
from stockstream.tables.windows import WindowAggregate
from stockstream.web import pages, snapshots
from stockstream.web.cluster import FORWARDED_HEADER, Cluster, advertised_url, partition_of
from stockstream.web.inspection import Inspection, parse_last
from stockstream.web.recent import RecentWindows

T0 = 1_767_623_400_000
MINUTE = 60_000
HOSTILE = '<script>alert("x")</script>&"\''
# A pattern that lets anything printable through, as a misconfigured QUOTE_SYMBOL_PATTERN might.
ANYTHING = r".+"


def quote(symbol: str, ts: int, price: float = 100.0) -> Quote:
    return Quote(symbol=symbol, current_price=price, market_timestamp=ts, source="replay", volume=1)


def closed(symbol: str, minute: int) -> WindowAggregate:
    return WindowAggregate.first(
        quote(symbol, T0 + minute * MINUTE), T0 + minute * MINUTE, MINUTE, 0
    )


def state_with(partition: int, quotes: list[Quote]) -> WindowState:
    state = WindowState({}, size_ms=MINUTE, grace_ms=5_000)
    windows = state.restore(partition)
    for offset, q in enumerate(quotes):
        windows.apply(q, offset)
    state.register(partition, windows)
    return state


# -- the ring -----------------------------------------------------------------------------------


def test_ring_keeps_the_newest_per_symbol_newest_first() -> None:
    recent = RecentWindows(per_symbol=3)
    recent.record(0, [closed("A", m) for m in range(5)], 41)
    assert [w.start_ms for w in recent.last("A", 10)] == [T0 + m * MINUTE for m in (4, 3, 2)]
    assert [w.start_ms for w in recent.last("A", 2)] == [T0 + 4 * MINUTE, T0 + 3 * MINUTE]
    assert recent.last("B", 5) == [] and recent.last("A", 0) == []
    assert len(recent) == 3
    assert recent.last_offset(0) == 41 and recent.since(0) is not None


def test_ring_total_bound_takes_from_the_least_recently_emitted_symbol() -> None:
    recent = RecentWindows(per_symbol=10, total=4)
    recent.record(0, [closed("OLD", 0), closed("OLD", 1)], 1)
    recent.record(1, [closed("NEW", 0), closed("NEW", 1), closed("NEW", 2)], 2)
    assert len(recent) == 4
    assert [w.start_ms for w in recent.last("OLD", 10)] == [T0 + MINUTE]
    recent.record(1, [closed("NEW", 3)], 3)
    assert recent.last("OLD", 10) == [] and recent.symbols(0) == []
    assert len(recent.last("NEW", 10)) == 4


def test_ring_forgets_revoked_partitions() -> None:
    recent = RecentWindows()
    recent.record(0, [closed("A", 0)], 5)
    recent.record(1, [closed("B", 0)], 6)
    recent.forget([0])
    assert recent.last("A", 5) == [] and recent.since(0) is None and recent.last_offset(0) is None
    assert recent.symbols(1) == ["B"] and len(recent) == 1


# -- JSON builders ------------------------------------------------------------------------------


def test_partition_snapshot_reports_clock_idle_state_and_open_windows() -> None:
    state = state_with(2, [quote("A", T0 + 1_000), quote("B", T0 + 2_000, 50.0)])
    recent = RecentWindows()
    recent.record(2, [closed("C", -3)], 17)
    windows = state.get(2)
    assert windows is not None
    snap = snapshots.partition_snapshot(2, windows, recent, 12.5, 10.0)
    assert snap["partition"] == 2 and snap["loaded"]
    assert snap["watermark"] == "2026-01-05T14:30:02.000Z"
    assert snap["last_offset"] == 1 and snap["emitted_offset"] == -1
    assert snap["last_emitted_offset"] == 17
    assert snap["idle"] == {"quiet_seconds": 12.5, "timeout_seconds": 10.0, "idle": True}
    assert snap["open_windows"] == 2
    assert [s["symbol"] for s in snap["symbols"]] == ["A", "B", "C"]
    assert snap["symbols"][1]["open"][0]["close"] == 50.0
    assert snap["symbols"][2]["open"] == []


def test_an_unloaded_partition_is_reported_as_such() -> None:
    snap = snapshots.partition_snapshot(1, None, RecentWindows(), None, 10.0)
    assert snap["loaded"] is False and snap["watermark"] is None
    assert snap["idle"]["idle"] is False and snap["last_emitted_offset"] is None


def test_symbol_view_has_open_windows_and_the_last_closed() -> None:
    state = state_with(0, [quote("A", T0 + 5 * MINUTE + 1), quote("A", T0 + 6 * MINUTE + 1)])
    recent = RecentWindows()
    recent.record(0, [closed("A", m) for m in range(5)], 9)
    view = snapshots.symbol_view("A", 0, state.get(0), recent, 2)
    assert [w["window_start_ms"] for w in view["open"]] == [T0 + 5 * MINUTE, T0 + 6 * MINUTE]
    assert [w["window_start_ms"] for w in view["closed"]] == [T0 + 4 * MINUTE, T0 + 3 * MINUTE]
    assert view["closed"][0] == closed("A", 4).to_record()


@pytest.mark.parametrize("raw", ["0", "501", "-1", "x", "1e3", "9" * 40])
def test_last_is_bounded(raw: str) -> None:
    with pytest.raises(Exception, match="1 to 500"):
        parse_last(raw)


def test_last_defaults_and_accepts_the_bound() -> None:
    assert parse_last(None) == 20 and parse_last("500") == 500


# -- HTML ---------------------------------------------------------------------------------------


def test_pages_escape_hostile_symbols_and_links() -> None:
    state = state_with(0, [quote(HOSTILE, T0 + 1)])
    recent = RecentWindows()
    recent.record(0, [closed(HOSTILE, -2)], 3)
    view = {**snapshots.symbol_view(HOSTILE, 0, state.get(0), recent, 5), "served_by": HOSTILE}
    snap = {**snapshots.partition_snapshot(0, state.get(0), recent, 1.0, 10.0), "owner": HOSTILE}
    rows = snapshots.symbol_rows([snap])
    for page in (
        pages.symbol_page(view),
        pages.partition_page(snap),
        pages.partitions_page([snap], [HOSTILE]),
        pages.symbols_page(rows, [HOSTILE]),
        pages.index_page(HOSTILE, HOSTILE),
        pages.error_page(400, HOSTILE),
    ):
        assert "<script>" not in page
        assert "&lt;script&gt;" in page
    link = pages.symbols_page(rows, [])
    assert 'href="/symbol/?symbol=%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E%26%22%27"' in link


def test_index_links_every_page_and_the_chart() -> None:
    page = pages.index_page("app", "http://w:1")
    for href in ("/symbols/", "/partitions/", "/chart/", "/health/", "/ready/", "/metrics/"):
        assert f'href="{href}"' in page


# -- routing between two workers ----------------------------------------------------------------


class Worker:
    """An Inspection served by a real aiohttp server; `owners` is shared by the cluster."""

    def __init__(self, owners: dict[str, dict[str, list[int]]], session: Any) -> None:
        self.owners = owners
        self.state = WindowState({}, size_ms=MINUTE, grace_ms=5_000)
        self.recent = RecentWindows()
        self.url = ""
        self.cluster = Cluster(lambda: self.url, lambda: self.owners, lambda: session, 3)
        self.partitions: set[int] = set()
        self.inspection = Inspection(
            "test",
            self.cluster,
            self.state,
            self.recent,
            QuoteValidator(ANYTHING, 300_000),
            lambda: self.partitions,
            10.0,
        )

    def own(self, partition: int, quotes: list[Quote]) -> None:
        windows = self.state.restore(partition)
        for offset, q in enumerate(quotes):
            windows.apply(q, offset)
        self.state.register(partition, windows)
        self.partitions.add(partition)
        self.owners.setdefault(self.url, {"changelog": []})["changelog"].append(partition)

    async def start(self) -> TestServer:
        app = web.Application()
        for path, handler in self.inspection.routes():
            app.router.add_get(path, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.url = str(server.make_url("")).rstrip("/")
        return server


def symbol_in(partition: int) -> str:
    return next(f"SYM{i}" for i in range(1000) if partition_of(f"SYM{i}", 3) == partition)


@pytest.fixture
async def two_workers() -> AsyncIterator[tuple[Worker, Worker, aiohttp.ClientSession]]:
    owners: dict[str, dict[str, list[int]]] = {}
    async with aiohttp.ClientSession() as session:
        a, b = Worker(owners, session), Worker(owners, session)
        servers = [await a.start(), await b.start()]
        a.own(0, [quote(symbol_in(0), T0 + 1)])
        b.own(1, [quote(symbol_in(1), T0 + 2)])
        b.own(2, [])
        b.recent.record(1, [closed(symbol_in(1), -1)], 7)
        try:
            yield a, b, session
        finally:
            for server in servers:
                await server.close()


async def fetch(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.get(url, **kw) as r:
        return r.status, await (r.json() if r.content_type == "application/json" else r.text())


async def test_either_worker_answers_for_any_symbol_through_its_owner(
    two_workers: tuple[Worker, Worker, aiohttp.ClientSession],
) -> None:
    a, b, session = two_workers
    for partition in (0, 1, 2):
        path = f"/api/symbol/?symbol={symbol_in(partition)}&last=5"
        from_a, from_b = await fetch(session, a.url + path), await fetch(session, b.url + path)
        assert from_a == from_b
        status, body = from_a
        assert status == 200 and body["partition"] == partition
        assert body["served_by"] == (a.url if partition == 0 else b.url)
    status, body = await fetch(session, a.url + f"/api/symbol/?symbol={symbol_in(1)}")
    assert len(body["closed"]) == 1 and len(body["open"]) == 1
    html_a = await fetch(session, a.url + f"/symbol/?symbol={symbol_in(1)}")
    assert html_a == await fetch(session, b.url + f"/symbol/?symbol={symbol_in(1)}")


async def test_lists_merge_every_owners_partitions(
    two_workers: tuple[Worker, Worker, aiohttp.ClientSession],
) -> None:
    a, b, session = two_workers
    status, body = await fetch(session, a.url + "/api/partitions/")
    assert status == 200 and body["errors"] == []
    assert [(s["partition"], s["owner"]) for s in body["partitions"]] == [
        (0, a.url),
        (1, b.url),
        (2, b.url),
    ]
    status, symbols = await fetch(session, b.url + "/api/symbols/")
    assert [(r["symbol"], r["partition"]) for r in symbols["symbols"]] == sorted(
        [(symbol_in(0), 0), (symbol_in(1), 1)]
    )
    status, local = await fetch(session, a.url + "/api/partitions/?scope=local")
    assert [s["partition"] for s in local["partitions"]] == [0]


async def test_an_owner_that_does_not_answer_is_named(
    two_workers: tuple[Worker, Worker, aiohttp.ClientSession],
) -> None:
    a, b, session = two_workers
    a.owners["http://127.0.0.1:9"] = a.owners.pop(b.url)  # nothing listens on port 9
    status, body = await fetch(session, a.url + "/api/partitions/")
    assert status == 200 and len(body["errors"]) == 1
    assert [s.get("error") is None for s in body["partitions"]] == [True, False, False]
    status, body = await fetch(session, a.url + f"/api/symbol/?symbol={symbol_in(1)}")
    assert status == 502 and "did not answer" in body["error"]


async def test_a_forwarded_request_is_never_forwarded_again(
    two_workers: tuple[Worker, Worker, aiohttp.ClientSession],
) -> None:
    a, b, session = two_workers
    # During a rebalance both may believe the other owns partition 1: no ping-pong, a 503.
    status, body = await fetch(
        session,
        a.url + f"/api/symbol/?symbol={symbol_in(1)}",
        headers={FORWARDED_HEADER: b.url},
    )
    assert status == 503 and "not owned by this worker" in body["error"]


async def test_bad_requests_are_refused_and_escaped(
    two_workers: tuple[Worker, Worker, aiohttp.ClientSession],
) -> None:
    a, _, session = two_workers
    status, body = await fetch(session, a.url + "/api/symbol/?symbol=" + "A" * 65)
    assert status == 400 and "1 to 64" in body["error"]
    status, page = await fetch(session, a.url + "/symbol/?symbol=%3Cb%3E%0A")
    assert status == 400 and "<b>" not in page and "&lt;b&gt;" in page
    assert (await fetch(session, a.url + "/api/partitions/3/"))[0] == 404
    assert (await fetch(session, a.url + "/api/partitions/x/"))[0] == 404
    async with session.get(a.url + "/symbols/") as r:
        assert "script-src" not in r.headers["Content-Security-Policy"]
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_partition_of_matches_the_producers_partitioner() -> None:
    from stockstream.producer.session import partition_for

    for symbol in ("AAPL", "BRK.B", "FXCM:XAU/USD", "IC MARKETS:1", "^GSPC"):
        assert partition_of(symbol, 6) == partition_for(symbol.encode(), list(range(6)))


async def test_symbols_with_url_characters_are_forwarded_intact(
    two_workers: tuple[Worker, Worker, aiohttp.ClientSession],
) -> None:
    a, b, session = two_workers
    symbol = next(s for i in range(1000) if partition_of(s := f"C&K/{i} X.NS", 3) == 1)
    b.own(1, [quote(symbol, T0 + 3)])
    path = "/api/symbol/?" + urlencode({"symbol": symbol, "last": 1})
    status, body = await fetch(session, a.url + path)
    assert status == 200 and body["symbol"] == symbol and body["served_by"] == b.url
    assert [w["symbol"] for w in body["open"]] == [symbol]


@pytest.mark.parametrize(
    ("host", "url", "expected"),
    [
        ("127.0.0.1", "", "http://127.0.0.1:6066"),
        ("worker-3.internal", "", "http://worker-3.internal:6066"),
        ("0.0.0.0", "", f"http://{socket.gethostname()}:6066"),
        ("::1", "", "http://[::1]:6066"),
        ("0.0.0.0", "http://w1.example:80/", "http://w1.example:80"),
    ],
)
def test_the_advertised_url_is_reachable_by_other_workers(
    host: str, url: str, expected: str
) -> None:
    worker = WorkerSettings(web_host=host, web_port=6066, web_url=url)
    assert advertised_url(worker) == expected


# -- the emitter's hook feeds the ring ----------------------------------------------------------


class Delivered:
    def __init__(self, offset: int) -> None:
        self.offset = offset


class Output:
    """A topic whose sends are acknowledged at increasing offsets."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, *, key: bytes, value: bytes, partition: int) -> Any:
        self.sent.append(value)
        done: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()
        done.set_result(Delivered(len(self.sent) - 1))
        return done


async def test_every_emitted_window_reaches_the_ring_and_a_broken_listener_stops_nothing() -> None:
    async def nothing_after(*args: Any) -> tuple[list[tuple[int, bytes | None]], int]:
        return [], -1

    output = Output()
    emitter = WindowEmitter(KafkaSettings(), cast(Any, output), nothing_after)
    recent = RecentWindows()

    def broken(partition: int, windows: Any, highest: int) -> None:
        raise RuntimeError("observer bug")

    emitter.listeners.extend([broken, recent.record])
    written, highest = await emitter.emit(1, -1, [closed("A", 0), closed("A", 1)])
    assert written == 2 and highest == 1 and len(output.sent) == 2
    assert [w.start_ms for w in recent.last("A", 5)] == [T0 + MINUTE, T0]
    assert recent.last_offset(1) == 1
