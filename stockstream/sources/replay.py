"""Replay recorded quotes from files at a chosen speed, keeping their event times.

Input: NDJSON (`*.ndjson`, `*.jsonl`) and CSV (`*.csv`, header row, empty cell = null) files,
optionally gzip-compressed (`*.ndjson.gz`, `*.jsonl.gz`, `*.csv.gz`), or directories holding
them (searched recursively, sorted by path; names starting with `.` or `_` are skipped, as
partial or marker files of archive writers are). Every record uses the `stock-quotes` field
names; it is validated like any other quote and comes out with `source="replay"` and its
`market_timestamp` (event time) untouched.

Formats plug in through `READERS`: a suffix mapped to a `RecordReader`, a function that takes a
path and lazily yields `Row`s (data or the reason it is unusable, with its line / row number).
The Parquet archive reader will be one more entry, e.g. `READERS[".parquet"] = read_parquet`.

Pacing: quote n is released when the monotonic clock reaches
`start + (ts_n - ts_first) / speed`, so the consumer's own processing time and sleep overshoot
never accumulate into drift; a quote whose time has already passed (out-of-order event time,
or a slow consumer) goes out immediately. `speed=0` never sleeps.

Nothing is dropped silently: each unusable row is logged with file, line and reason and counted
in `ReplaySource.skipped`; `strict=True` raises `ReplayError` on the first one instead.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import dataclasses
import gzip
import io
import logging
import math
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.quotes import ContractError, Quote, QuoteValidator, Source

log = logging.getLogger(__name__)

# Skip reason of a file whose rest could not be read (truncated gzip, I/O error); the number of
# rows lost with it is unknown, so it counts files, not rows.
UNREADABLE = "unreadable"

# Rows handled between two cooperative yields to the event loop: without an await, a fast
# (speed 0 or behind schedule) replay would starve signal handlers and other tasks.
_YIELD_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Row:
    """One record read from a file: its fields, or why it is unusable.

    `line` is the 1-based line number for text formats (the first line of a multi-line CSV
    record), the 1-based row number for columnar formats.
    """

    line: int
    data: dict[str, Any] | None
    reason: str = Reason.MALFORMED.value
    error: str = ""

    @classmethod
    def bad(cls, line: int, reason: Reason | str, error: str) -> Row:
        return cls(line, None, str(reason), error)


RecordReader = Callable[[Path], Iterator[Row]]


class ReplayError(ValueError):
    """A row (or file) that `strict=True` refuses, located as `file:line`."""

    def __init__(self, path: Path, line: int, reason: str, error: str) -> None:
        super().__init__(f"{path}:{line}: {reason}: {error}")
        self.path = path
        self.line = line
        self.reason = reason
        self.error = error


def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def read_ndjson(path: Path) -> Iterator[Row]:
    """One JSON object per line, read line by line; blank lines are not records."""
    with _open_binary(path) as stream:
        for number, raw in enumerate(stream, start=1):
            line = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
            if not line.strip():
                continue
            try:
                data = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield Row.bad(number, Reason.MALFORMED, f"not UTF-8 JSON: {exc}")
                continue
            if not isinstance(data, dict):
                yield Row.bad(
                    number, Reason.MALFORMED, f"expected a JSON object, got {type(data).__name__}"
                )
                continue
            yield Row(number, data)


_TEXT_FIELDS = frozenset({"symbol", "source"})
_NUMERIC_FIELDS = frozenset(f.name for f in dataclasses.fields(Quote)) - _TEXT_FIELDS


def _number(text: str) -> int | float | None:
    if "_" in text:  # int()/float() accept "1_000"; a CSV export never means that
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def read_csv(path: Path) -> Iterator[Row]:
    """A header row, then one record per row; empty cells are null, contract numbers parsed.

    Columns the contract does not know are passed through as text (the validator ignores
    them). Bytes that are not UTF-8 become U+FFFD, which no symbol or number accepts.
    """
    with (
        _open_binary(path) as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as text,
    ):
        reader = csv.reader(text)
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row.bad(start, Reason.MALFORMED, f"bad CSV: {exc}")
                continue
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # blank line
            if header is None:
                header = [name.strip() for name in cells]
                continue
            if len(cells) != len(header):
                yield Row.bad(
                    start,
                    Reason.MALFORMED,
                    f"{len(cells)} fields, the header has {len(header)}",
                )
                continue
            record: dict[str, Any] = {}
            error = ""
            for name, cell in zip(header, cells, strict=True):
                value = cell.strip()
                if not value:
                    record[name] = None
                elif name in _NUMERIC_FIELDS:
                    number = _number(value)
                    if number is None:
                        error = f"{name} must be a number, got {value!r}"
                        break
                    record[name] = number
                else:
                    record[name] = value
            if error:
                yield Row.bad(start, Reason.INVALID, error)
            else:
                yield Row(start, record)


# Longest matching suffix wins (".csv.gz" before ".gz"); matched case-insensitively.
READERS: dict[str, RecordReader] = {
    ".ndjson": read_ndjson,
    ".jsonl": read_ndjson,
    ".ndjson.gz": read_ndjson,
    ".jsonl.gz": read_ndjson,
    ".csv": read_csv,
    ".csv.gz": read_csv,
}


def reader_for(
    path: Path, readers: Mapping[str, RecordReader] | None = None
) -> RecordReader | None:
    name = path.name.lower()
    table = READERS if readers is None else readers
    for suffix in sorted(table, key=len, reverse=True):
        if name.endswith(suffix.lower()):
            return table[suffix]
    return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def replay_files(
    paths: Sequence[Path], readers: Mapping[str, RecordReader] | None = None
) -> list[Path]:
    """The files to replay, in order: given files as given, directories expanded and sorted.

    Raises FileNotFoundError for a missing path and ValueError for a file of unknown type;
    a file reached twice is replayed once.
    """
    table = READERS if readers is None else readers
    files: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        found: list[Path]
        if path.is_dir():
            found = sorted(
                (
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and not _hidden(p.relative_to(path))
                    and reader_for(p, table) is not None
                ),
                key=lambda p: p.relative_to(path).parts,
            )
            if not found:
                log.warning("replay: no replayable files in directory", extra={"file": str(path)})
        elif path.exists():
            if reader_for(path, table) is None:
                supported = ", ".join(sorted(table))
                raise ValueError(f"{path}: cannot replay this file type (supported: {supported})")
            found = [path]
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        for file in found:
            identity = file.resolve()
            if identity in seen:
                log.warning("replay: file given twice, replayed once", extra={"file": str(file)})
                continue
            seen.add(identity)
            files.append(file)
    return files


class ReplaySource:
    """Quotes recorded in files, released at `speed` times their original pace.

    `skipped` counts unusable rows by reason (`malformed`, `invalid`, and `unreadable` files),
    `replayed` the quotes yielded; both restart with each `quotes()` iteration.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        speed: float,
        validator: QuoteValidator,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        strict: bool = False,
        wall_clock: Callable[[], float] = time.time,
        readers: Mapping[str, RecordReader] | None = None,
    ) -> None:
        if math.isnan(speed) or speed < 0:
            raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {speed!r}")
        self.speed = speed
        self.strict = strict
        self._readers: dict[str, RecordReader] = dict(READERS if readers is None else readers)
        self.files = replay_files(paths, self._readers)
        self._validator = validator
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self.skipped: dict[str, int] = {}
        self.replayed = 0

    async def quotes(self) -> AsyncIterator[Quote]:
        self.skipped = {}
        self.replayed = 0
        start: float | None = None
        first_ts = 0
        handled = 0
        for path in self.files:
            reader = reader_for(path, self._readers)
            assert reader is not None  # replay_files kept only readable files
            log.debug("replay: reading file", extra={"file": str(path)})
            rows = reader(path)
            last_line = 0
            try:
                while True:
                    try:
                        row = next(rows)
                    except StopIteration:
                        break
                    except (OSError, EOFError, zlib.error) as exc:
                        self._skip(path, last_line + 1, UNREADABLE, f"rest of file lost: {exc}")
                        break
                    last_line = row.line
                    handled += 1
                    if handled % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a yield to the loop, not pacing
                    quote = self._quote(path, row)
                    if quote is None:
                        continue
                    if self.speed > 0:
                        now = self._clock()
                        if start is None:
                            start, first_ts = now, quote.market_timestamp
                        else:
                            due = start + (quote.market_timestamp - first_ts) / 1000 / self.speed
                            if due > now:
                                await self._sleep(due - now)
                    self.replayed += 1
                    yield quote
            finally:
                close = getattr(rows, "close", None)  # generators: release the file now
                if close is not None:
                    close()
        level = logging.WARNING if self.skipped else logging.INFO
        log.log(
            level,
            "replay finished",
            extra={
                "files": len(self.files),
                "replayed": self.replayed,
                "skipped": dict(self.skipped),
            },
        )

    def _quote(self, path: Path, row: Row) -> Quote | None:
        if row.data is None:
            self._skip(path, row.line, row.reason, row.error)
            return None
        # Replayed data is `replay` by contract, whatever the recording said (or lacked).
        data = {**row.data, "source": Source.REPLAY.value}
        symbol = data.get("symbol")
        key = symbol.encode("utf-8", "replace") if isinstance(symbol, str) else None
        try:
            return self._validator.validate(key, data, int(self._wall_clock() * 1000))
        except ContractError as exc:
            self._skip(path, row.line, exc.reason.value, exc.error)
            return None

    def _skip(self, path: Path, line: int, reason: str, error: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.strict:
            raise ReplayError(path, line, reason, error)
        log.log(
            logging.ERROR if reason == UNREADABLE else logging.WARNING,
            "replay: skipped %s record at %s:%d: %s",
            reason,
            path,
            line,
            error,
            extra={"file": str(path), "line": line, "reason": reason, "error": error},
        )
