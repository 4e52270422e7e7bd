"""Which worker answers for a symbol or a partition, and asking it.

A symbol's windows live in the worker that owns its quotes partition (the producer's key is
the symbol, partitioned by aiokafka's default murmur2 partitioner, as Java's). Faust's
`@app.table_route` / `app.router.route_req` cannot find it: they hash the *table key* with the
changelog topic's partitioner, while our table keys (`w|<partition>|<symbol>|<start>`,
`c|<partition>`) are written to the changelog partition of the source partition they belong to,
whatever their hash. So the route is taken by partition, from the same routing metadata Faust's
router reads (`app.router.table_metadata`: which worker URL holds which changelog partition of
the window table, i.e. the active owner of that source partition), and the request is forwarded
with Faust's HTTP client, as `route_req` does, with three differences: only the headers the
answer depends on are forwarded, a bounded timeout, and a header that marks a forwarded request
so that two workers that disagree during a rebalance never bounce a request between them (the
receiver answers what it has, or 503).

Each worker advertises `STOCKSTREAM_WEB_URL` (Faust's `canonical_url`): by default
`http://<STOCKSTREAM_WEB_HOST>:<STOCKSTREAM_WEB_PORT>`, with this host's name in place of a
wildcard bind address such as 0.0.0.0, which no other worker could connect to.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiokafka.partitioner import DefaultPartitioner
from yarl import URL

from stockstream.settings import WorkerSettings

#: Marks a request one worker forwarded to another (its value: the sender's URL).
FORWARDED_HEADER = "X-Stockstream-Forwarded-By"
#: The request headers a forwarded request keeps.
FORWARDED_HEADERS = ("Accept", "Authorization")
FORWARD_TIMEOUT_SECONDS = 5.0

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
_PARTITIONER = DefaultPartitioner()


def advertised_url(worker: WorkerSettings) -> str:
    """The URL other workers reach this one's web server at (module doc)."""
    if worker.web_url:
        return worker.web_url.rstrip("/")
    host = socket.gethostname() if worker.web_host in _WILDCARDS else worker.web_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{worker.web_port}"


def partition_of(symbol: str, partitions: int) -> int:
    """The quotes partition of `symbol` (the producer's partitioner, key = the symbol)."""
    every = list(range(partitions))
    return int(_PARTITIONER(symbol.encode(), every, every))


def _ident(url: URL | str) -> tuple[str, int]:
    url = URL(str(url))
    return (url.host or "").lower(), int(url.port or 80)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


class Cluster:
    """This worker's view of who owns which partition of the window table."""

    def __init__(
        self,
        self_url: Callable[[], URL | str],
        table_metadata: Callable[[], Mapping[str, Mapping[str, list[int]]]],
        http_client: Callable[[], aiohttp.ClientSession],
        partitions: int,
    ) -> None:
        """`table_metadata`: {worker URL: {changelog topic: [partitions]}} of the window table
        (`app.router.table_metadata(TABLE_NAME)`); `self_url`: this worker's canonical URL."""
        self._self_url = self_url
        self._metadata = table_metadata
        self._http = http_client
        self.partitions = partitions

    @property
    def url(self) -> str:
        return str(self._self_url()).rstrip("/")

    def owners(self) -> dict[int, str]:
        """Partition -> URL of the worker that owns it (missing: unassigned right now)."""
        found: dict[int, str] = {}
        for url, topics in self._metadata().items():
            for partitions in topics.values():
                for partition in partitions:
                    found[int(partition)] = str(url).rstrip("/")
        return found

    def owner(self, partition: int) -> str | None:
        return self.owners().get(partition)

    def is_self(self, url: str) -> bool:
        return _ident(url) == _ident(self.url)

    async def get(self, url: str, path_qs: str, headers: Mapping[str, str]) -> Answer:
        """GET `path_qs` (path and query) from the worker at `url`, marked as forwarded."""
        sent = {k: v for k, v in headers.items() if k.title() in FORWARDED_HEADERS}
        sent[FORWARDED_HEADER] = self.url
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_SECONDS)
        async with self._http().get(
            str(URL(url).join(URL(path_qs))), headers=sent, timeout=timeout, allow_redirects=False
        ) as response:
            body = await response.read()
            return Answer(response.status, body, response.content_type)


async def gather_json(
    cluster: Cluster, urls: list[str], path_qs: str, headers: Mapping[str, str]
) -> dict[str, Any]:
    """GET `path_qs` as JSON from every worker in `urls`: {url: body or {"error": ...}}."""

    async def one(url: str) -> Any:
        try:
            answer = await cluster.get(url, path_qs, headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return {"error": f"{url} did not answer: {type(exc).__name__}"}
        if answer.status != 200:
            return {"error": f"{url} answered {answer.status}"}
        try:
            return json.loads(answer.body)
        except ValueError:
            return {"error": f"{url} answered something that is not JSON"}

    bodies = await asyncio.gather(*(one(url) for url in urls))
    return dict(zip(urls, bodies, strict=True))
