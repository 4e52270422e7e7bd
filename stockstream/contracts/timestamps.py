"""Instants as the contracts write them: epoch milliseconds, and ISO-8601 UTC text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

#: Anything below is seconds (or garbage), not epoch milliseconds: 1e11 ms is March 1973.
MIN_EPOCH_MS = 100_000_000_000
#: 10000-01-01T00:00:00Z, beyond every warehouse's TIMESTAMP type.
MAX_EPOCH_MS = 253_402_300_800_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def iso_utc(epoch_ms: int) -> str:
    """`2026-01-05T14:30:00.000Z`."""
    return (
        datetime.fromtimestamp(epoch_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_iso(text: str) -> int:
    """Epoch milliseconds of an ISO-8601 timestamp that names its time zone; ValueError
    otherwise."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {text!r}")
    return (parsed - _EPOCH) // _MS
