"""The `stock-quotes-dlq` contract: a record some stage could not process, with the reason.

A dead letter carries the original key and value (as text, or base64 when they are not UTF-8)
and where the original is (`topic`, `partition`, `offset`, which identify it), so it can be
inspected and re-driven (`stockstream dlq redrive`) once its cause is fixed.

A dead letter always fits in one Kafka record: an original too large to carry whole (the
broker refuses records over about 1 MiB, and the envelope adds to the original) is cut, and
`key_truncated`/`value_truncated`, `key_bytes`/`value_bytes` and `key_sha256`/`value_sha256`
say so and identify it; the complete original stays at its coordinates in its topic.
The topic is at-least-once: after a crash a dead letter may appear twice; its consumers
deduplicate on (`topic`, `partition`, `offset`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import orjson

from stockstream.contracts.timestamps import iso_utc
from stockstream.errors import StockstreamError


class Reason(StrEnum):
    """Machine-readable dead-letter reasons."""

    MALFORMED = "malformed"  # not a UTF-8 JSON object
    INVALID = "invalid"  # JSON, but breaks the contract
    LATE = "late"  # its window was already emitted
    ARCHIVE_FAILED = "archive-failed"  # the raw archive could not store it
    ARCHIVE_REJECTED = "archive-rejected"  # a valid quote the archive cannot encode
    WAREHOUSE_REJECTED = "warehouse-rejected"  # the warehouse refused the row for good
    ALERT_FAILED = "alert-failed"  # an alert receiver refused the anomaly or stayed down
    INTERNAL_ERROR = "internal-error"  # a bug of ours; the worker log has the traceback


#: The fields a re-drive needs; a record without them is not a dead letter.
REQUIRED_FIELDS = frozenset(
    ("key", "key_base64", "value", "value_base64", "topic", "partition", "offset", "reason")
)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "key": (str, type(None)),
    "key_base64": (bool,),
    "value": (str, type(None)),
    "value_base64": (bool,),
    "topic": (str,),
    "partition": (int,),
    "offset": (int,),
    "reason": (str,),
}


class NotADeadLetter(StockstreamError, ValueError):
    """A record of the dead-letter topic that does not follow this contract."""


def _text_or_base64(raw: bytes | None) -> tuple[str | None, bool]:
    if raw is None:
        return None, False
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), True


def _carried(name: str, raw: bytes | None, limit: int | None) -> dict[str, Any]:
    """The fields that carry one original part (`key` or `value`), cut to `limit` bytes."""
    fields: dict[str, Any] = {}
    if raw is not None and limit is not None and len(raw) > limit:
        # Cut on a character boundary when it is text, so it stays text.
        cut = raw[: max(0, limit)]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            cut = cut.decode("utf-8", "ignore").encode("utf-8")
        fields[f"{name}_truncated"] = True
        fields[f"{name}_bytes"] = len(raw)
        fields[f"{name}_sha256"] = hashlib.sha256(raw).hexdigest()
        raw = cut
    text, is_b64 = _text_or_base64(raw)
    return {name: text, f"{name}_base64": is_b64, **fields}


def dead_letter(
    *,
    key: bytes | None,
    value: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    reason: Reason,
    error: str,
    failed_at_ms: int,
    max_key_bytes: int | None = None,
    max_value_bytes: int | None = None,
) -> dict[str, Any]:
    """A `stock-quotes-dlq` record: everything needed to inspect or re-drive the original
    (key and value cut to the given sizes, when given and exceeded)."""
    return {
        **_carried("key", key, max_key_bytes),
        **_carried("value", value, max_value_bytes),
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "reason": reason.value,
        "error": error,
        "failed_at": iso_utc(failed_at_ms),
    }


def parse_dead_letter(value: bytes | None) -> dict[str, Any]:
    """The dead letter in a record value; `NotADeadLetter` names what is missing."""
    try:
        body = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError as exc:
        raise NotADeadLetter(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise NotADeadLetter("not a JSON object")
    missing = REQUIRED_FIELDS.difference(body)
    if missing:
        raise NotADeadLetter(f"missing field(s) {', '.join(sorted(missing))}")
    # Anyone with write access can put a record on the topic: type every field a re-drive
    # reads, so a list where a number belongs is a clear refusal, not a crash.
    for name, expected in _FIELD_TYPES.items():
        field = body[name]
        if not isinstance(field, expected) or (isinstance(field, bool) and bool not in expected):
            raise NotADeadLetter(f"field {name!r} has the wrong type: {type(field).__name__}")
    if body["partition"] < 0 or body["offset"] < 0:
        raise NotADeadLetter("partition and offset must be >= 0")
    return body


def is_truncated(record: Mapping[str, Any]) -> bool:
    """True when the dead letter does not carry the whole original."""
    return bool(record.get("key_truncated") or record.get("value_truncated"))


def original_bytes(record: Mapping[str, Any]) -> tuple[bytes | None, bytes | None]:
    """The original key and value of a dead-letter record (inverse of `dead_letter`; for a
    truncated one, only the part it carries)."""

    def decode(text: str | None, is_b64: bool) -> bytes | None:
        if text is None:
            return None
        try:
            return base64.b64decode(text, validate=True) if is_b64 else text.encode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise NotADeadLetter(f"undecodable original: {exc}") from None

    return decode(record["key"], record["key_base64"]), decode(
        record["value"], record["value_base64"]
    )
