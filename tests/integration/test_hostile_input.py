"""A real worker fed a valid stream with a few thousand hostile records mixed in: huge,
deeply nested, not UTF-8, boundary numbers, wrong types, key/symbol mismatches, a symbol whose
clock is a month ahead. The worker stays up, every valid window is exact, every hostile record
is in the DLQ with the right reason, and the archive and the warehouse hold exactly the valid
data (neither stalls on any of it)."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.integration.harness import T0, Stack, Worker, create_topics, dataset, produce, read_all
from tests.reference import assert_window_equal, expected_windows

pytestmark = pytest.mark.integration

MONTH_MS = 30 * 24 * 3_600_000


def quote(symbol: str, ts: int, **fields: Any) -> dict[str, Any]:
    base = {
        "symbol": symbol,
        "current_price": 101.5,
        "market_timestamp": ts,
        "source": "replay",
        "volume": None,
    }
    return base | fields


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile(rng: random.Random, symbols: list[str]) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, expected outcome): "malformed", "invalid" or "valid"."""
    out: list[tuple[bytes | None, bytes | None, str]] = []

    def add(key: bytes | None, value: bytes | None, outcome: str) -> None:
        out.append((key, value, outcome))

    def js(record: Any) -> bytes:
        return json.dumps(record).encode()

    for i in range(2_400):
        sym = rng.choice(symbols)
        key, ts = sym.encode(), T0 + rng.randrange(10 * 60_000)
        kind = i % 24
        if kind == 0:
            add(key, os.urandom(rng.randrange(1, 300)), "malformed")  # not UTF-8 / not JSON
        elif kind == 1:
            add(key, nested(rng.choice((1_100, 5_000))), "malformed")  # beyond orjson's depth
        elif kind == 2:
            add(key, js([1, 2, 3]), "malformed")
        elif kind == 3:
            add(key, None, "malformed")  # a tombstone
        elif kind == 4:
            add(key, js(quote(sym, ts, current_price=1e200, volume=1e200)), "invalid")
        elif kind == 5:
            add(key, js(quote(sym, ts, fetched_at=2**64 - 1)), "invalid")
        elif kind == 6:
            add(key, js(quote(sym, ts, current_price="101.5")), "invalid")
        elif kind == 7:
            add(key, js(quote(sym, ts, current_price=True)), "invalid")
        elif kind == 8:
            add(key, js(quote(sym, ts // 1000)), "invalid")  # seconds, not milliseconds
        elif kind == 9:
            add(b"OTHER", js(quote(sym, ts)), "invalid")  # key/symbol mismatch
        elif kind == 10:
            add(None, js(quote(sym, ts)), "invalid")
        elif kind == 11:
            add(b"AAPL\n", js(quote("AAPL\n", ts)), "invalid")
        elif kind == 12:
            long = "A" * rng.choice((65, 1_000, 100_000))
            add(long.encode(), js(quote(long, ts)), "invalid")
        elif kind == 13:
            add(key, js(quote(sym, ts, current_price=-0.0)), "invalid")
        elif kind == 14:
            add(key, js(quote(sym, ts, volume=-1)), "invalid")
        elif kind == 15:
            add(key, js(quote(sym, ts, day_high=1.0, day_low=2.0)), "invalid")
        elif kind == 16:
            add(key, b'{"symbol": "' + key + b'", "current_price": NaN}', "malformed")
        elif kind == 17:
            add(key, js(quote(sym, ts, source="somewhere")), "invalid")
        elif kind == 18:
            add(key, js({"symbol": sym}), "invalid")
        elif kind == 19:
            add(key, js(quote(sym, ts, market_timestamp=ts + 0.5)), "invalid")
        elif kind == 20:
            add(key, js(quote(sym, ts, current_price=10**30)), "invalid")
        elif kind == 21:
            add(key, js(quote(sym, ts, change_percent=float("1e10"))), "invalid")
        elif kind == 22:
            add(key, "🙂 not json".encode() + b"\xff", "malformed")
        else:
            add(key, js({**quote(sym, ts), "symbol": 123}), "invalid")
    # Huge records: one close to the broker's limit and not UTF-8 (its dead letter would be
    # ~1 MB of base64 if carried whole), one large valid JSON object with a huge extra field.
    add(symbols[0].encode(), os.urandom(760_000), "malformed")
    add(symbols[1].encode(), js(quote(symbols[1], T0, note="x" * 700_000)), "valid")
    return out


async def test_hostile_records_in_a_valid_stream(kafka_bootstrap: str, tmp_path: Path) -> None:
    rng = random.Random(2026)
    stack = Stack(kafka_bootstrap, tmp_path / "data", idle_timeout=4.0)
    await create_topics(stack)
    valid = dataset(symbols=24, minutes=10, per_minute=10, seed=5)
    symbols = sorted({key.decode() for key, _, _ in valid})
    bad = hostile(rng, symbols)
    # One symbol's clock jumps a month ahead (a mis-dated row); the valid extremes count.
    future = (symbols[2].encode(), json.dumps(quote(symbols[2], T0 + MONTH_MS)).encode(), "valid")
    extremes = [
        (s.encode(), json.dumps(quote(s, T0 + 30_000, current_price=1e12, volume=1e15)).encode())
        for s in symbols[3:5]
    ]
    # The data set's own bad records: not JSON (malformed) or a negative price (invalid).
    rows: list[tuple[bytes | None, bytes | None, str]] = [
        (k, v, "valid" if ok else ("malformed" if v == b"{not json" else "invalid"))
        for k, v, ok in valid
    ]
    for item in [*bad, future, *((k, v, "valid") for k, v in extremes)]:
        rows.insert(rng.randrange(len(rows) + 1), item)
    produced = await produce(
        kafka_bootstrap,
        stack.quotes,
        [(k, v, outcome == "valid") for k, v, outcome in rows],  # type: ignore[misc]
    )
    expected_reasons = Counter(outcome for _, _, outcome in rows if outcome != "valid")
    expected, late = expected_windows(produced.records)
    worker = Worker(stack, tmp_path / "worker.log")
    started = time.monotonic()
    try:
        worker.wait_ready(timeout=120)
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(expected), settle=5)
        dlq = await read_all(
            kafka_bootstrap,
            stack.dlq,
            until=len(produced.invalid) + len(late),
            wait_s=60,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            metrics = _metrics(worker.get("/metrics/")[1])
            archived = metrics.get("stockstream_archive_records_total", 0.0)
            loaded = metrics.get('stockstream_warehouse_rows_total{outcome="written"}', 0.0)
            if archived >= len(produced.records) and loaded >= len(expected):
                break
            time.sleep(0.5)
        assert worker.get("/health/")[0] == 200, "the worker must still be up"
        assert worker.proc.poll() is None
    finally:
        worker.stop()
    elapsed = time.monotonic() - started

    keys = [(v["symbol"], v["window_start_ms"]) for _, _, _, v, _ in windows]
    duplicated = [k for k, n in Counter(keys).items() if n > 1]
    missing = sorted(set(expected) - set(keys))
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for _, _, _, letter, _ in dlq:
        seen.setdefault((letter["partition"], letter["offset"]), letter)
    reasons = Counter(letter["reason"] for letter in seen.values())
    print(
        f"HOSTILE records_in={len(rows)} valid={len(produced.records)}"
        f" hostile={len(produced.invalid)} windows_expected={len(expected)}"
        f" windows_out={len(windows)} missing={len(missing)} duplicated={len(duplicated)}"
        f" dead_letters={dict(reasons)} dlq_duplicates={len(dlq) - len(seen)}"
        f" archived={archived} loaded={loaded} elapsed={elapsed:.1f}s",
        flush=True,
    )
    assert duplicated == [] and missing == [], (missing[:5], duplicated[:5])
    assert set(keys) == set(expected)
    for _, _, _, value, _ in windows:
        want = expected[(value["symbol"], value["window_start_ms"])]
        assert_window_equal(value, want)
        assert all(not isinstance(x, float) or math.isfinite(x) for x in value.values()), (
            "every number of an emitted window is finite"
        )
    # The month-ahead quote opened its own window and closed nothing of the others.
    assert (symbols[2], (T0 + MONTH_MS) // 60_000 * 60_000) in expected
    assert reasons["internal-error"] == 0
    assert reasons["late"] == len(late)
    assert {(p, o) for p, o in produced.invalid} <= set(seen)
    assert reasons["malformed"] == expected_reasons["malformed"]
    assert reasons["invalid"] == expected_reasons["invalid"]
    # Dead letters of the huge records fit in one Kafka record and say what they cut.
    cut = [letter for letter in seen.values() if letter.get("value_truncated")]
    assert len(cut) == 1 and cut[0]["value_bytes"] == 760_000
    assert archived == len(produced.records), "the archive holds every valid record"
    assert loaded == len(expected), "the warehouse holds every window"
    with duckdb.connect(str(stack.data_dir / "warehouse.duckdb"), read_only=True) as conn:
        rows_in_table = conn.execute("SELECT count(*) FROM aggregates_1m").fetchone()
    assert rows_in_table == (len(expected),)


def _metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
