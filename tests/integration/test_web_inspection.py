"""The inspection pages against two real workers in one consumer group on a real broker:
whichever worker is asked, a symbol or a partition is answered by its owner, so both give the
same answer; the closed windows shown are the ones in the output topic; Faust's raw table view
needs the bearer token; health and readiness list the dependencies."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.harness import Stack, Worker, create_topics, dataset, produce, read_all
from tests.reference import expected_windows

pytestmark = pytest.mark.integration

TOKEN = "inspection-test-token"


def get(worker: Worker, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{worker.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(body) if "json" in ctype else body.decode()


def wait_split(workers: list[Worker], partitions: int, timeout: float = 90.0) -> list[set[int]]:
    """Wait until the workers own disjoint, non-empty sets of partitions covering all."""
    deadline = time.monotonic() + timeout
    owned: list[set[int]] = []
    while time.monotonic() < deadline:
        owned = []
        for worker in workers:
            status, body = get(worker, "/api/partitions/?scope=local")
            owned.append({p["partition"] for p in body["partitions"]} if status == 200 else set())
        ready = all(get(w, "/ready/")[0] == 200 for w in workers)
        covered = set().union(*owned) == set(range(partitions))
        if ready and all(owned) and covered and sum(len(o) for o in owned) == partitions:
            return owned
        time.sleep(0.5)
    raise TimeoutError(f"partitions not split between the workers: {owned}")


def stable(body: dict[str, Any]) -> dict[str, Any]:
    """A partitions answer without what moves with the wall clock."""
    for snap in body["partitions"]:
        snap.get("idle", {}).pop("quiet_seconds", None)
        snap.get("idle", {}).pop("idle", None)
    return body


async def test_two_workers_answer_alike_for_every_symbol(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(
        kafka_bootstrap, tmp_path / "data", partitions=3, extra_env={"STOCKSTREAM_WEB_TOKEN": TOKEN}
    )
    await create_topics(stack)
    workers = [Worker(stack, tmp_path / "w1.log"), Worker(stack, tmp_path / "w2.log")]
    try:
        for worker in workers:
            worker.wait_ready()
        owned = wait_split(workers, stack.partitions)

        produced = await produce(
            kafka_bootstrap, stack.quotes, dataset(symbols=24, minutes=5, per_minute=4)
        )
        # Every partition has symbols, so each worker owns some and half the asks are routed.
        assert len({r.partition for r in produced.records}) == stack.partitions
        expected, _ = expected_windows(produced.records)
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected))
        assert len(windows) == len(expected)
        by_symbol: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
        for partition, offset, _, value, _ in windows:
            by_symbol.setdefault(value["symbol"], []).append((partition, offset, value))
        source_partition = {r.symbol: r.partition for r in produced.records}

        urls = set()
        for symbol, emitted in sorted(by_symbol.items()):
            path = f"/api/symbol/?symbol={quote(symbol)}&last=500"
            answers = [get(w, path) for w in workers]
            assert answers[0] == answers[1], symbol
            status, body = answers[0]
            assert status == 200, body
            assert body["partition"] == source_partition[symbol]
            assert body["open"] == []
            newest_first = [v for _, _, v in sorted(emitted, key=lambda e: -e[1])]
            assert body["closed"] == newest_first
            urls.add(body["served_by"])
            # The owner answered: the worker that owns the symbol's partition.
            owner = workers[0] if body["partition"] in owned[0] else workers[1]
            assert body["served_by"].endswith(f":{owner.port}")
            status, three = get(workers[1 - workers.index(owner)], path.replace("500", "3"))
            assert status == 200 and three["closed"] == newest_first[:3]
        assert len(urls) == 2, "both workers own symbols of the data set"

        html = [get(w, f"/symbol/?symbol={quote(sorted(by_symbol)[0])}") for w in workers]
        assert html[0] == html[1] and html[0][0] == 200
        assert sorted(by_symbol)[0] in html[0][1]

        symbols = [get(w, "/api/symbols/") for w in workers]
        assert symbols[0] == symbols[1]
        rows = symbols[0][1]["symbols"]
        assert [r["symbol"] for r in rows] == sorted(by_symbol)
        assert all(r["partition"] == source_partition[r["symbol"]] for r in rows)

        parts = [stable(get(w, "/api/partitions/")[1]) for w in workers]
        assert parts[0] == parts[1]
        assert parts[0]["errors"] == []
        last_offsets: dict[int, int] = {}
        for partition, offset, _, _, _ in windows:
            last_offsets[partition] = max(last_offsets.get(partition, -1), offset)
        assert [s["partition"] for s in parts[0]["partitions"]] == [0, 1, 2]
        for snap in parts[0]["partitions"]:
            assert snap["open_windows"] == 0
            assert snap["last_emitted_offset"] == last_offsets[snap["partition"]]
        for path in ("/", "/symbols/", "/partitions/", "/partitions/0/"):
            status, page = get(workers[0], path)
            assert status == 200 and page.startswith("<!doctype html>"), path
        assert 'href="/chart/"' in get(workers[1], "/")[1]

        # Hostile input is answered, escaped, never reflected raw.
        status, page = get(workers[0], "/symbol/?symbol=%3Cscript%3Ealert(1)%3C/script%3E")
        assert status == 400 and "<script>" not in page and "&lt;script&gt;" in page
        assert get(workers[0], "/api/symbol/?symbol=S000&last=501")[0] == 400
        assert get(workers[0], "/api/partitions/7/")[0] == 404

        # Faust's raw table dump needs the token.
        assert get(workers[0], "/table/window-state/")[0] == 401
        bad = {"Authorization": "Bearer nope"}
        assert get(workers[0], "/table/window-state/", bad)[0] == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert get(workers[0], "/table/window-state/", good)[0] == 200

        for worker in workers:
            status, body = get(worker, "/health/")
            assert status == 200
            assert set(body["dependencies"]) == {"broker", "object_store", "warehouse"}
            assert body["dependencies"]["broker"]["state"] == "up"
            status, body = get(worker, "/ready/")
            assert status == 200 and body["failing"] == [], body
    finally:
        for worker in workers:
            worker.stop()
