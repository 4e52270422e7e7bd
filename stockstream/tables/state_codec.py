"""How window state is written to the changelog-backed table: versioned records with named
fields, so a field can be added, renamed or reordered without corrupting a restored changelog.

    {"v": 1, "symbol": "AAPL", "start_ms": ..., ...}      a WindowAggregate
    {"v": 1, "watermark_ms": ..., ...}                      a PartitionClock

Before versioning (stockstream 0.1) both were positional JSON lists in the dataclasses' field
order of that release ("version 0"). Those are still read, so a running deployment upgrades
without losing its open windows: the mirror rewrites each window in the current version the
next time it changes, and the clock at the next checkpoint. A record of an unknown version (a
rollback after a newer release wrote state) is refused with `StateFormatError`, never guessed.
"""

from __future__ import annotations

import dataclasses
import math
from operator import attrgetter
from typing import Any, TypeVar

from stockstream.errors import StockstreamError
from stockstream.tables.windows import PartitionClock, WindowAggregate

VERSION = 1

# Version 0: the positional layouts of stockstream 0.1, fixed here forever.
_V0_WINDOW = (
    "symbol",
    "start_ms",
    "size_ms",
    "count",
    "sum",
    "min",
    "max",
    "open",
    "open_ts",
    "close",
    "close_ts",
    "volume",
    "price_volume",
    "first_event_ms",
    "last_event_ms",
    "last_offset",
)
_V0_CLOCK = ("watermark_ms", "closed_until_ms", "last_offset", "emitted_offset")

T = TypeVar("T", WindowAggregate, PartitionClock)


class StateFormatError(StockstreamError, ValueError):
    """A table value this version cannot read."""


def _fields(kind: type[Any]) -> tuple[tuple[str, ...], attrgetter[Any]]:
    names = tuple(f.name for f in dataclasses.fields(kind))
    return names, attrgetter(*names)


# Not dataclasses.asdict: it deep-copies and looks the fields up each time, and this runs for
# every changed window of every batch.
_WINDOW_FIELDS, _window_values = _fields(WindowAggregate)
_CLOCK_FIELDS, _clock_values = _fields(PartitionClock)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return (_int(value) or isinstance(value, float)) and math.isfinite(value)


def _optional_finite(value: Any) -> bool:
    return value is None or _finite(value)


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _marks(value: Any) -> bool:
    return isinstance(value, dict) and all(_text(k) and _int(v) for k, v in value.items())


# What each stored field may hold: a value JSON could not carry faithfully (a non-finite
# number becomes null) or of the wrong type is refused when read, not met later as a TypeError.
_KINDS: dict[type[Any], dict[str, Any]] = {
    WindowAggregate: {
        **dict.fromkeys(_WINDOW_FIELDS, _finite),
        "symbol": _text,
        "volume": _optional_finite,
        **dict.fromkeys(
            ("start_ms", "size_ms", "count", "open_ts", "close_ts", "first_event_ms"), _int
        ),
        **dict.fromkeys(("last_event_ms", "last_offset"), _int),
        "provisional": _bool,
    },
    PartitionClock: {
        **dict.fromkeys(_CLOCK_FIELDS, _int),
        "symbol_watermarks": _marks,
        "symbol_closed_until": _marks,
    },
}
_REQUIRED: dict[type[Any], set[str]] = {
    kind: {
        f.name
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    for kind in (WindowAggregate, PartitionClock)
}


def _decode(kind: type[T], v0: tuple[str, ...], value: Any) -> T:
    if isinstance(value, list):
        if len(value) != len(v0):
            raise StateFormatError(
                f"{kind.__name__}: a version-0 record has {len(v0)} fields, got {len(value)}"
            )
        fields = dict(zip(v0, value, strict=True))
    elif isinstance(value, dict):
        version = value.get("v")
        if version != VERSION:
            raise StateFormatError(
                f"{kind.__name__}: state version {version!r} is not one this release reads"
                f" (it reads 0 and {VERSION}); was it written by a newer stockstream?"
            )
        fields = {k: v for k, v in value.items() if k != "v"}
    else:
        raise StateFormatError(f"{kind.__name__}: unexpected state {type(value).__name__}")
    # A field added later with a default may be absent (written before it existed); any other
    # difference is damage or another release's format.
    required = _REQUIRED[kind]
    missing = required - fields.keys()
    unknown = fields.keys() - _KINDS[kind].keys()
    if missing or unknown:
        raise StateFormatError(
            f"{kind.__name__}: fields do not match (missing {sorted(missing)},"
            f" unknown {sorted(unknown)})"
        )
    for name, value in fields.items():
        if not _KINDS[kind][name](value):
            raise StateFormatError(f"{kind.__name__}: {name} has an invalid value {value!r:.80}")
    return kind(**fields)


def encode_window(window: WindowAggregate) -> dict[str, Any]:
    record = dict(zip(_WINDOW_FIELDS, _window_values(window), strict=True))
    record["v"] = VERSION
    return record


def decode_window(value: Any) -> WindowAggregate:
    return _decode(WindowAggregate, _V0_WINDOW, value)


def encode_clock(clock: PartitionClock) -> dict[str, Any]:
    record = dict(zip(_CLOCK_FIELDS, _clock_values(clock), strict=True))
    # Copies: Faust serialises a table value when it sends the changelog record, later than
    # this call; the live dicts must not leak later progress into an earlier checkpoint.
    record["symbol_watermarks"] = dict(clock.symbol_watermarks)
    record["symbol_closed_until"] = dict(clock.symbol_closed_until)
    record["v"] = VERSION
    return record


def decode_clock(value: Any) -> PartitionClock:
    return _decode(PartitionClock, _V0_CLOCK, value)
