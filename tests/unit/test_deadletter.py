"""The one path into the DLQ: a dead letter always fits in one Kafka record, whatever the
original, and says what it cut."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockstream.contracts.dead_letters import Reason, is_truncated, original_bytes
from stockstream.deadletter import MAX_KEY_BYTES, DeadLetters

LIMIT = 900_000


@dataclass
class Original:
    key: bytes | None
    value: bytes | None
    topic: str = "stock-quotes"
    partition: int = 1
    offset: int = 42


def encode(key: bytes | None, value: bytes | None) -> tuple[bytes | None, dict[str, Any], int]:
    dead_letters = DeadLetters(send=None, max_record_bytes=LIMIT)  # type: ignore[arg-type]
    record_key, body = dead_letters.encode(Original(key, value), Reason.MALFORMED, "why", 0)
    return record_key, orjson.loads(body), len(body)


def test_a_small_record_is_carried_whole() -> None:
    key, body, _ = encode(b"AAPL", b"\xff\xfe not utf-8")
    assert key == b"AAPL"
    assert not is_truncated(body)
    assert original_bytes(body) == (b"AAPL", b"\xff\xfe not utf-8")


@pytest.mark.parametrize(
    "value",
    [
        os.urandom(760_000),  # the case: base64 of it alone is ~1 MB
        b"\x01" * 1_000_000,  # JSON escapes each byte to \u0001 (6x)
        b'"' * 2_000_000,
        b"a" * 5_000_000,
    ],
    ids=["binary-760k", "control-chars", "quotes", "text-5m"],
)
def test_a_large_original_is_cut_to_fit_and_identified(value: bytes) -> None:
    key, body, size = encode(b"AAPL", value)
    assert size <= LIMIT
    assert key == b"AAPL"
    assert body["value_truncated"] is True
    assert body["value_bytes"] == len(value)
    assert body["value_sha256"] == hashlib.sha256(value).hexdigest()
    _, carried = original_bytes(body)
    assert carried is not None and value.startswith(carried) and len(carried) > 0
    assert (body["topic"], body["partition"], body["offset"]) == ("stock-quotes", 1, 42)


def test_an_absurd_key_is_replaced_by_its_hash_as_the_record_key() -> None:
    big_key = b"K" * 100_000
    key, body, size = encode(big_key, b"{}")
    assert size <= LIMIT
    assert key == b"sha256:" + hashlib.sha256(big_key).hexdigest().encode()
    assert len(key) <= MAX_KEY_BYTES
    assert original_bytes(body)[0] == big_key  # the body still carries it whole


@settings(max_examples=50, deadline=None)
@given(
    key=st.none() | st.binary(max_size=2_000),
    value=st.none() | st.binary(max_size=40_000),
    limit=st.integers(min_value=16_384, max_value=60_000),
)
def test_any_original_fits_any_limit(key: bytes | None, value: bytes | None, limit: int) -> None:
    dead_letters = DeadLetters(send=None, max_record_bytes=limit)  # type: ignore[arg-type]
    record_key, body = dead_letters.encode(Original(key, value), Reason.INVALID, "x" * 5_000, 0)
    assert len(body) <= limit
    assert record_key is None or len(record_key) <= max(MAX_KEY_BYTES, 7 + 64)
    parsed = orjson.loads(body)
    carried_key, carried_value = original_bytes(parsed)
    if not is_truncated(parsed):
        assert (carried_key, carried_value) == (key, value)


async def test_send_hands_the_fitted_record_to_the_producer() -> None:
    sent: list[tuple[bytes | None, bytes]] = []

    async def send(key: bytes | None, value: bytes) -> Any:
        sent.append((key, value))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    dead_letters = DeadLetters(send, max_record_bytes=LIMIT)
    delivery = await dead_letters.send(Original(b"AAPL", os.urandom(760_000)), Reason.INVALID, "x")
    await delivery
    assert len(sent) == 1 and len(sent[0][1]) <= LIMIT
