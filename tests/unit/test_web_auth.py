"""The bearer-token rule: which endpoints need STOCKSTREAM_WEB_TOKEN, and how it is checked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from stockstream.settings import Secret
from stockstream.web import auth


def test_no_token_configured_refuses_with_a_message_naming_the_variable() -> None:
    refused = auth.refusal(Secret(""), "Bearer anything")
    assert refused is not None
    status, message = refused
    assert status == 403 and "set STOCKSTREAM_WEB_TOKEN" in message


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Bearer ", 401),
        ("Basic s3cret", 401),
        ("Bearer s3cre", 401),
        ("Bearer s3cret!", 401),
        ("Bearer s3cret", None),
        ("bearer s3cret", None),
        ("  Bearer s3cret  ", None),
    ],
)
def test_the_token_must_match(header: str | None, status: int | None) -> None:
    refused = auth.refusal(Secret("s3cret"), header)
    assert (refused[0] if refused else None) == status


def test_the_message_never_contains_the_token() -> None:
    refused = auth.refusal(Secret("s3cret"), "Bearer wrong")
    assert refused is not None and "s3cret" not in refused[1]


@pytest.mark.parametrize(
    ("pattern", "protected"),
    [
        ("/table/", True),
        ("/table/{name}/", True),
        ("/router/{name}/{key}/", True),
        ("/graph/", True),
        ("/stats/", True),
        ("/assignment/", True),
        ("/performance/", True),
        ("/tables-of-contents/", False),
        ("/", False),
        ("/symbols/", False),
        ("/api/partitions/{partition}/", False),
        ("/health/", False),
        ("/ready/", False),
        ("/metrics/", False),
        ("/windows/", False),
    ],
)
def test_which_routes_are_protected(pattern: str, protected: bool) -> None:
    assert auth.is_protected(pattern) is protected


Serve = Callable[[Secret], Coroutine[Any, Any, str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[TestServer] = []

    async def start(token: Secret) -> str:
        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application(middlewares=[auth.middleware(token)])
        app.router.add_get("/table/{name}/", ok)
        app.router.add_get("/router/", ok)
        app.router.add_get("/symbols/", ok)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def status(url: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        return r.status


async def test_without_a_token_protected_routes_are_refused_others_open(serve: Serve) -> None:
    base = await serve(Secret(""))
    assert await status(base + "/table/window-state/") == 403
    assert await status(base + "/table/window-state/", {"Authorization": "Bearer "}) == 403
    assert await status(base + "/router/") == 403
    assert await status(base + "/symbols/") == 200


async def test_with_a_token_protected_routes_need_it(serve: Serve) -> None:
    base = await serve(Secret("s3cret"))
    assert await status(base + "/table/window-state/") == 401
    assert await status(base + "/table/window-state/", {"Authorization": "Bearer no"}) == 401
    good = {"Authorization": "Bearer s3cret"}
    assert await status(base + "/table/window-state/", good) == 200
    assert await status(base + "/router/", good) == 200
    assert await status(base + "/symbols/") == 200


@pytest.mark.parametrize(
    "path", ["/%74able/window-state/", "//table/window-state/", "/table/x%2F/"]
)
async def test_no_spelling_of_a_protected_url_slips_past(serve: Serve, path: str) -> None:
    base = await serve(Secret("s3cret"))
    assert await status(base + path) in (401, 404)
