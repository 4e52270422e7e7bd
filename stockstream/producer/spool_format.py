"""One spool record as one line of a segment file, and back.

A line is `{"s": seq, "k": key, "v": value, "t": timestamp_ms}` (`kb`/`vb` hold base64 instead
when a key/value is not UTF-8). Decoding checks every field, because a crash may have cut the last
line short: a damaged line raises ValueError, and the spool skips and reports it
(`SpoolIssue`) instead of failing.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    seq: int
    key: bytes | None
    value: bytes
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SpoolIssue:
    """A line that was skipped: where it is and why."""

    segment: str
    offset: int  # byte offset of the line in its segment
    reason: str


def encode_line(record: SpoolRecord) -> bytes:
    line: dict[str, Any] = {"s": record.seq}
    for short, raw in (("k", record.key), ("v", record.value)):
        if raw is None:
            line[short] = None
            continue
        try:
            line[short] = raw.decode("utf-8")
        except UnicodeDecodeError:
            line[short + "b"] = base64.b64encode(raw).decode("ascii")
    if record.timestamp_ms is not None:
        line["t"] = record.timestamp_ms
    return orjson.dumps(line) + b"\n"


def _field(line: dict[str, Any], short: str) -> bytes | None:
    if short + "b" in line:
        b64 = line[short + "b"]
        if not isinstance(b64, str):
            raise ValueError(f"{short}b is not a string")
        return base64.b64decode(b64, validate=True)
    text = line.get(short)
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{short} is not a string")
    return text.encode("utf-8")


def decode_line(raw: bytes) -> SpoolRecord:
    """Parse one line (without its newline); raises ValueError when it is damaged."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise ValueError("not a JSON object")
    seq = line.get("s")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError("missing or invalid sequence number")
    try:
        key = _field(line, "k")
        value = _field(line, "v")
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"bad key/value: {exc}") from None
    if value is None:
        raise ValueError("missing value")
    ts = line.get("t")
    if ts is not None and (not isinstance(ts, int) or isinstance(ts, bool)):
        raise ValueError("invalid timestamp")
    return SpoolRecord(seq, key, value, ts)
