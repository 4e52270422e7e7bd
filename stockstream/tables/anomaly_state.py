"""The anomaly detector's changelog-backed table (`define_table`), its versioned record format
and its write-behind mirror (`AnomalyState`), per partition of `stock-quotes-aggregated`.

Key layout, all in the changelog partition of the input partition they belong to:
    h|<partition>|<symbol>  -> a SymbolHistory: the last window folded, its close, the recent
                               one-minute returns and volumes, when each kind was last reported
    p|<partition>           -> a DetectorProgress: the last input offset processed and the
                               output offset up to which every anomaly belongs to a folded window
Histories are written before the progress record of the same batch; writes are ordered within
a changelog partition, so a crash leaves a prefix of them and the progress is never ahead of
the histories it describes.

Values are versioned records with named fields (`{"v": 1, "symbol": ...}`), as the window
table's (state_codec.py): a value of another version or with other fields is refused with
`StateFormatError`, never guessed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import faust

from stockstream.contracts.anomalies import AnomalyKind
from stockstream.metrics import STATE_UNREADABLE
from stockstream.tables.state_codec import StateFormatError

log = logging.getLogger(__name__)

TABLE_NAME = "anomaly-state"
VERSION = 1
#: A stored series longer than this is damage: refused rather than held in memory.
MAX_STORED_VALUES = 100_000
_KINDS = frozenset(k.value for k in AnomalyKind)


@dataclass(slots=True)
class SymbolHistory:
    symbol: str
    last_start_ms: int  # start of the last window folded: a window at or before it is not
    last_close: float
    returns: list[float] = field(default_factory=list)  # oldest first
    volumes: list[float] = field(default_factory=list)  # oldest first
    # kind -> window_start_ms of the last anomaly of that kind reported (event time).
    last_reported_ms: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class DetectorProgress:
    last_offset: int = -1  # input offset of the last record processed
    emitted_offset: int = -1  # output checkpoint: anomalies up to it belong to folded windows


@dataclass
class PartitionHistories:
    """The mirror of one partition: its progress and its symbols' histories."""

    progress: DetectorProgress = field(default_factory=DetectorProgress)
    symbols: dict[str, SymbolHistory] = field(default_factory=dict)

    def folded_until(self, symbol: str) -> int | None:
        history = self.symbols.get(symbol)
        return None if history is None else history.last_start_ms


def define_table(app: faust.App, partitions: int) -> Any:
    """The table on `app` (its changelog topic is `<app id>-anomaly-state-changelog`)."""
    return app.Table(
        TABLE_NAME,
        default=None,
        partitions=partitions,
        schema=faust.Schema(key_serializer="json", value_serializer="json"),
        # Every window rewrites its symbol's history: keep the changelog compacted, with
        # segments closed often enough for the cleaner to reach them (a worker that takes a
        # partition over replays the changelog; tables/window_state.py).
        extra_topic_configs={"segment.ms": "10000", "min.cleanable.dirty.ratio": "0.1"},
        help="Anomaly detector: symbol histories (h|partition|symbol), progress (p|partition)",
    )


def history_key(partition: int, symbol: str) -> str:
    return f"h|{partition}|{symbol}"


def progress_key(partition: int) -> str:
    return f"p|{partition}"


# -- the record format -------------------------------------------------------------------------


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return (_int(value) or isinstance(value, float)) and math.isfinite(value)


def _text(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64


def _series(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_STORED_VALUES and all(map(_finite, value))


def _reported(value: Any) -> bool:
    return isinstance(value, dict) and all(k in _KINDS and _int(v) for k, v in value.items())


_HISTORY = {
    "symbol": _text,
    "last_start_ms": _int,
    "last_close": _finite,
    "returns": _series,
    "volumes": _series,
    "last_reported_ms": _reported,
}
_PROGRESS = {"last_offset": _int, "emitted_offset": _int}


def _fields(name: str, checks: dict[str, Any], value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateFormatError(f"{name}: unexpected state {type(value).__name__}")
    version = value.get("v")
    if version != VERSION:
        raise StateFormatError(
            f"{name}: state version {version!r:.20} is not one this release reads"
            f" ({VERSION}); was it written by a newer stockstream?"
        )
    fields = {k: v for k, v in value.items() if k != "v"}
    missing, unknown = checks.keys() - fields.keys(), fields.keys() - checks.keys()
    if missing or unknown:
        raise StateFormatError(
            f"{name}: fields do not match (missing {sorted(missing)},"
            f" unknown {sorted(map(str, unknown))[:5]})"
        )
    for key, item in fields.items():
        if not checks[key](item):
            raise StateFormatError(f"{name}: {key} has an invalid value {item!r:.80}")
    return fields


def encode_history(history: SymbolHistory) -> dict[str, Any]:
    # Copies: Faust serialises the value when it sends the changelog record, later than this
    # call; the live lists must not leak later folds into this write.
    return {
        "v": VERSION,
        "symbol": history.symbol,
        "last_start_ms": history.last_start_ms,
        "last_close": history.last_close,
        "returns": list(history.returns),
        "volumes": list(history.volumes),
        "last_reported_ms": dict(history.last_reported_ms),
    }


def decode_history(value: Any) -> SymbolHistory:
    fields = _fields("SymbolHistory", _HISTORY, value)
    return SymbolHistory(
        symbol=fields["symbol"],
        last_start_ms=fields["last_start_ms"],
        last_close=float(fields["last_close"]),
        returns=[float(x) for x in fields["returns"]],
        volumes=[float(x) for x in fields["volumes"]],
        last_reported_ms=dict(fields["last_reported_ms"]),
    )


def encode_progress(progress: DetectorProgress) -> dict[str, Any]:
    return {
        "v": VERSION,
        "last_offset": progress.last_offset,
        "emitted_offset": progress.emitted_offset,
    }


def decode_progress(value: Any) -> DetectorProgress:
    return DetectorProgress(**_fields("DetectorProgress", _PROGRESS, value))


# -- the mirror --------------------------------------------------------------------------------


class AnomalyState:
    """Reads go to the in-memory mirror; changed histories are written once per batch,
    followed by the partition's progress (the caller provides the stream context)."""

    def __init__(self, table: MutableMapping[str, Any]) -> None:
        self._table = table
        self._partitions: dict[int, PartitionHistories] = {}
        self._dirty: dict[int, set[str]] = {}

    def get(self, partition: int) -> PartitionHistories | None:
        return self._partitions.get(partition)

    def restore(self, partition: int) -> PartitionHistories:
        """The mirror of one partition rebuilt from the (recovered) table, not used yet
        (`register` does, once the caller knows what the partition already emitted)."""
        loaded = PartitionHistories()
        key = progress_key(partition)
        stored = self._table.get(key)
        if stored is not None:
            try:
                loaded.progress = decode_progress(stored)
            except StateFormatError as exc:
                # A fresh progress reads back the whole output partition: slower, never wrong.
                _unreadable(partition, key, exc)
        prefix = f"h|{partition}|"
        for key, value in self._table.items():
            if value is None or not key.startswith(prefix):
                continue
            try:
                history = decode_history(value)
            except StateFormatError as exc:
                # The symbol starts a new history: its next window is judged against nothing.
                _unreadable(partition, key, exc)
                continue
            loaded.symbols[history.symbol] = history
        return loaded

    def register(self, partition: int, histories: PartitionHistories) -> None:
        self._partitions[partition] = histories

    def forget(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._partitions.pop(partition, None)
            self._dirty.pop(partition, None)

    def mark_dirty(self, partition: int, symbol: str) -> None:
        self._dirty.setdefault(partition, set()).add(symbol)

    def write(self, partition: int) -> None:
        """Write the changed histories of `partition`, then its progress."""
        histories = self._partitions[partition]
        for symbol in sorted(self._dirty.pop(partition, ())):
            self._table[history_key(partition, symbol)] = encode_history(histories.symbols[symbol])
        self._table[progress_key(partition)] = encode_progress(histories.progress)


def _unreadable(partition: int, key: str, exc: StateFormatError) -> None:
    STATE_UNREADABLE.inc()
    log.error(
        "anomaly table value unreadable, skipped",
        extra={"partition": partition, "key": key, "error": str(exc)},
    )
