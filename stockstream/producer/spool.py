"""A local, append-only, crash-safe spool of Kafka records (JSONL segments).

Longer than ~400 lines on purpose: `Spool` is one state machine. Its writer, its read cursor,
the acknowledgement state and the deletion of segments share the segment list and the
acknowledged prefix, and the crash safety lies in the order of their steps (the state is
durable before a segment goes; the cursor finds its place again when one does). Split up, those
rules would sit in files that each look right alone. The line format, which needs none of it,
is in spool_format.py.

The producer writes here what the broker could not take (or what has to queue behind records
that are already waiting) and re-sends it, in order, once the broker is back or on the next
start. Layout of a spool directory:

    seg-<first seq, 20 digits>.jsonl   records, one JSON object per line, append-only
    state.json                          what is acknowledged, replaced atomically
    lock                                flock()ed by the one process that owns the spool

A line is one record (spool_format.py). Sequence numbers grow by one per appended record and
are never reused, also across restarts and after the spool was emptied (only those of records
that a crash lost, and that no saved state counted yet, are given again).

Durability: `append` only buffers; `flush(fsync=True)` writes and fsyncs (the producer does it
in batches, every few tens of milliseconds, and on flush/close). A crash can therefore lose the
records appended after the last fsync, and may leave a partial last line: a line that does not
parse (or has no newline at the end of a segment that is no longer being written) is skipped
and reported in `issues`, never fatal. Appends after a restart always go to a new segment, so
a damaged tail is never glued to a new record.

A segment's file is created (and the directory fsynced) before its records are written, so a
power cut can also leave a segment file in which not one line is a record: empty, a partial
line, zeros. Such a file is not a segment: opening the spool reports it in `issues` and removes
it before any new segment is created (its name is usually the next sequence number). No state
has to be written first, as it holds nothing the durable state could be waiting for. A new
segment is always a new file (created exclusively, never appended to), so the segment list
holds each file once, in order, with the one being written last; deleting acknowledged
segments never touches that one.

Acknowledgement: records are handed out in order by `read()`; `ack(seq)` may come in any order
(records of different partitions are acknowledged independently). The state keeps the longest
fully acknowledged prefix (`acked_through`) plus the acknowledged records beyond it
(`delivered`), so a crash re-sends at most the unacknowledged records. Segments wholly inside
the acknowledged prefix are deleted after the state that acknowledges them is durable; when
nothing is pending every segment is removed. `meta` is an opaque JSON object stored with the
state for the spool's user (the producer keeps its reconciliation baseline there).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from stockstream.errors import StockstreamError
from stockstream.producer.spool_format import SpoolIssue, SpoolRecord, decode_line, encode_line

log = logging.getLogger(__name__)

SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".jsonl"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
_STATE_VERSION = 1


class SpoolError(StockstreamError):
    """The spool cannot be used (unreadable state, I/O error)."""


class SpoolLockedError(SpoolError):
    """Another process owns this spool directory."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    last_seq: int = 0  # highest sequence number in it (0: none known yet)


class _Cursor:
    """Read position: a segment, a byte offset in it and the last sequence number passed."""

    __slots__ = ("file", "index", "last_seq", "offset")

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        self.index = -1  # segment index, -1 = locate from last_seq
        self.offset = 0
        self.file: IO[bytes] | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Spool:
    """See the module docstring. Not thread-safe; one owner process (enforced by a lock)."""

    def __init__(
        self,
        directory: Path | str,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        buffer_bytes: int = 256 * 1024,
    ) -> None:
        self.directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._buffer_bytes = buffer_bytes
        self.issues: list[SpoolIssue] = []
        self._issue_keys: set[tuple[str, int]] = set()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / LOCK_FILE, "a+b")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SpoolLockedError(
                f"spool {self.directory} is in use by another process"
                " (give each producer process its own PRODUCER_SPOOL_DIR)"
            ) from None
        self._closed = False
        # Durable state.
        self.acked_through = 0
        self.meta: dict[str, Any] = {}
        self._delivered: set[int] = set()  # acknowledged beyond acked_through
        self._next_seq = 1
        self._load_state()
        # Segments and counts.
        self._segments: list[_Segment] = []  # by first_seq, one per file; the writer's last
        self.pending = 0
        void = self._scan()
        # Writer: always a new segment after open.
        self._writer: IO[bytes] | None = None
        self._writer_segment: _Segment | None = None
        self._writer_size = 0
        self._buffer = bytearray()
        self._buffer_first_seq = 0
        self._unsynced = False
        self._state_dirty = False
        # Reader.
        self._cursor = _Cursor(self.acked_through)
        self._outstanding: deque[int] = deque()  # read, not yet acknowledged, in read order
        self._remove_void_segments(void)
        self._drop_acknowledged_segments()

    # ------------------------------------------------------------------ state

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def delivered(self) -> frozenset[int]:
        return frozenset(self._delivered)

    def is_acknowledged(self, seq: int) -> bool:
        return seq <= self.acked_through or seq in self._delivered

    def _load_state(self) -> None:
        path = self.directory / STATE_FILE
        if not path.exists():
            return
        try:
            state = orjson.loads(path.read_bytes())
            acked = int(state["acked_through"])
            delivered = {int(s) for s in state.get("delivered", [])}
            next_seq = int(state.get("next_seq", acked + 1))
            meta = state.get("meta") or {}
            if not isinstance(meta, dict):
                raise ValueError("meta is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Written atomically, so this is outside damage. Starting from zero re-sends
            # acknowledged records (duplicates) but loses nothing.
            self._report(
                STATE_FILE, 0, f"unreadable state, treating every record as pending: {exc}"
            )
            return
        self.acked_through = acked
        self._delivered = {s for s in delivered if s > acked}
        self._next_seq = max(next_seq, acked + 1)
        self.meta = meta

    def save(self, meta: dict[str, Any] | None = None) -> None:
        """Persist the acknowledgement state (and `meta`) atomically, then delete segments
        that are wholly acknowledged (all of them when nothing is pending). Also writes
        buffered records to the current segment (without fsync)."""
        if meta is not None:
            self.meta = meta
            self._state_dirty = True
        self._write_buffer()
        compact = self.pending == 0 and bool(self._segments)
        if compact:
            # Everything appended so far is acknowledged: the state says so *before* the
            # files go, so a crash in between cannot resurrect or renumber anything.
            self.acked_through = self._next_seq - 1
            self._delivered.clear()
            self._outstanding.clear()
            self._state_dirty = True
        if self._state_dirty:
            self._write_state()
        if compact:
            self._compact()
        else:
            self._drop_acknowledged_segments()

    def _write_state(self) -> None:
        self._prune_delivered()
        state = {
            "version": _STATE_VERSION,
            "acked_through": self.acked_through,
            "delivered": sorted(self._delivered),
            "next_seq": self._next_seq,
            "meta": self.meta,
        }
        path = self.directory / STATE_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        self._state_dirty = False

    def _prune_delivered(self) -> None:
        if self._delivered:
            self._delivered = {s for s in self._delivered if s > self.acked_through}

    # ------------------------------------------------------------------ scan

    def _report(self, segment: str, offset: int, reason: str) -> None:
        key = (segment, offset)
        if key in self._issue_keys:
            return
        self._issue_keys.add(key)
        issue = SpoolIssue(segment, offset, reason)
        self.issues.append(issue)
        log.warning(
            "spool line skipped",
            extra={
                "spool": str(self.directory),
                "segment": segment,
                "offset": offset,
                "reason": reason,
            },
        )

    def _scan(self) -> list[_Segment]:
        """Find segments, count pending records, find the highest sequence number. Returns
        the files without a single record in them (left by a crash): not segments."""
        found: list[_Segment] = []
        for path in self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
            digits = path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
            if not digits.isdigit():
                continue
            found.append(_Segment(path, int(digits)))
        found.sort(key=lambda s: s.first_seq)
        highest = 0
        void: list[_Segment] = []
        for seg in found:
            for _offset, record in self._iter_segment(seg, 0, active=False):
                if record is None:
                    continue
                seg.last_seq = record.seq
                highest = max(highest, record.seq)
                if not self.is_acknowledged(record.seq):
                    self.pending += 1
            if seg.last_seq == 0:
                # Reported at its end: a damaged line at 0 is an issue of its own.
                self._report(
                    seg.path.name,
                    seg.path.stat().st_size,
                    "no record in the segment (left by a crash): removed",
                )
                void.append(seg)
        self._segments = [seg for seg in found if seg.last_seq > 0]
        self._next_seq = max(self._next_seq, highest + 1)
        return void

    def _remove_void_segments(self, void: list[_Segment]) -> None:
        """Delete the files `_scan` found without a record. Nothing in them can be pending,
        so no state has to be written first; it must happen before the writer creates a
        segment, which would often have the same name."""
        for seg in void:
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()
        if void:
            _fsync_dir(self.directory)

    def _iter_segment(
        self, seg: _Segment, offset: int, *, active: bool, f: IO[bytes] | None = None
    ) -> Iterator[tuple[int, SpoolRecord | None]]:
        """(offset after the line, record or None for a skipped line) from byte `offset`.

        Sequence numbers must grow; a line that breaks that is skipped as damaged. On the
        active segment an incomplete last line is not yet written, so iteration stops before
        it instead of reporting it."""
        own = f is None
        if f is None:
            f = open(seg.path, "rb")  # noqa: SIM115 - closed below
        try:
            f.seek(offset)
            previous = 0
            while True:
                start = f.tell()
                raw = f.readline()
                if not raw:
                    return
                if not raw.endswith(b"\n"):
                    if active:
                        f.seek(start)
                        return
                    self._report(seg.path.name, start, "partial last line (crash while writing)")
                    yield f.tell(), None
                    return
                try:
                    record = decode_line(raw[:-1])
                except ValueError as exc:
                    self._report(seg.path.name, start, str(exc))
                    yield f.tell(), None
                    continue
                if record.seq < seg.first_seq or record.seq <= previous:
                    self._report(seg.path.name, start, f"sequence {record.seq} out of order")
                    yield f.tell(), None
                    continue
                previous = record.seq
                yield f.tell(), record
        finally:
            if own:
                f.close()

    # ------------------------------------------------------------------ write

    def append(self, key: bytes | None, value: bytes, timestamp_ms: int | None = None) -> int:
        """Buffer one record; returns its sequence number. Durable after `flush(fsync=True)`."""
        if self._closed:
            raise SpoolError("spool is closed")
        seq = self._next_seq
        self._next_seq += 1
        if not self._buffer:
            self._buffer_first_seq = seq
        self._buffer += encode_line(SpoolRecord(seq, key, value, timestamp_ms))
        self.pending += 1
        if len(self._buffer) >= self._buffer_bytes:
            self._write_buffer()
        return seq

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        if self._writer is None or self._writer_size >= self._segment_bytes:
            self._rotate()
        assert self._writer is not None
        self._writer.write(self._buffer)
        self._writer.flush()
        self._writer_size += len(self._buffer)
        self._segments[-1].last_seq = self._next_seq - 1
        self._buffer.clear()
        self._unsynced = True

    def _rotate(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
            self._writer = None
            self._writer_segment = None
        first = self._buffer_first_seq
        assert not self._segments or self._segments[-1].first_seq < first
        path = self.directory / f"{SEGMENT_PREFIX}{first:020d}{SEGMENT_SUFFIX}"
        # Exclusively: never append to a file that is there already, nor list one file twice
        # (opening removed those without a record; one with records has a lower number). An
        # error here fails the append/flush like any I/O error; the next write tries again.
        self._writer = open(path, "xb")  # noqa: SIM115 - closed in _rotate/_compact/close
        self._writer_size = 0
        self._writer_segment = seg = _Segment(path, first)
        self._segments.append(seg)
        _fsync_dir(self.directory)

    def flush(self, fsync: bool = True) -> None:
        """Write buffered records; with `fsync` also make them durable."""
        self._write_buffer()
        if fsync and self._unsynced and self._writer is not None:
            os.fsync(self._writer.fileno())
            self._unsynced = False

    @property
    def unsynced(self) -> bool:
        return bool(self._buffer) or self._unsynced

    @property
    def state_dirty(self) -> bool:
        return self._state_dirty

    # ------------------------------------------------------------------ read

    def _locate(self, cursor: _Cursor) -> None:
        """Point the cursor at the segment that holds the record after `last_seq`."""
        cursor.close()
        cursor.index = 0
        for i, seg in enumerate(self._segments):
            if seg.first_seq <= cursor.last_seq + 1:
                cursor.index = i
        cursor.offset = 0

    def read(self, limit: int) -> list[SpoolRecord]:
        """The next unacknowledged records, in order, at most `limit`. Each is remembered as
        outstanding until acknowledged; `rewind()` hands them out again."""
        return self._read_from(self._cursor, limit, upto=None, track=True)

    def _read_from(
        self, cursor: _Cursor, limit: int, upto: int | None, track: bool
    ) -> list[SpoolRecord]:
        self._write_buffer()
        out: list[SpoolRecord] = []
        if cursor.index < 0:
            self._locate(cursor)
        while len(out) < limit and cursor.index < len(self._segments):
            seg = self._segments[cursor.index]
            active = self._writer is not None and cursor.index == len(self._segments) - 1
            if cursor.file is None:
                cursor.file = open(seg.path, "rb")  # noqa: SIM115 - closed by the cursor
            for offset, record in self._iter_segment(
                seg, cursor.offset, active=active, f=cursor.file
            ):
                if record is not None and upto is not None and record.seq > upto:
                    return out
                cursor.offset = offset
                if record is None or record.seq <= cursor.last_seq:
                    continue
                cursor.last_seq = record.seq
                if record.seq <= self.acked_through:
                    continue
                if track:
                    # Acknowledged ones (found delivered when reconciling) join the queue
                    # too, so the acknowledged prefix can grow over them.
                    self._outstanding.append(record.seq)
                if record.seq in self._delivered:
                    if track:
                        self._pop_prefix()
                    continue
                out.append(record)
                if len(out) >= limit:
                    return out
            if cursor.index == len(self._segments) - 1:
                break  # caught up with the writer
            cursor.close()
            cursor.index += 1
            cursor.offset = 0
        return out

    def scan(self, upto: int) -> list[SpoolRecord]:
        """Unacknowledged records with seq <= `upto`, in order, without moving the read
        cursor (the producer reconciles these against the topic)."""
        cursor = _Cursor(self.acked_through)
        try:
            return self._read_from(cursor, limit=1 << 62, upto=upto, track=False)
        finally:
            cursor.close()

    def rewind(self) -> None:
        """Forget what was handed out and not acknowledged: `read()` starts again at the
        first unacknowledged record."""
        self._outstanding.clear()
        self._cursor.close()
        self._cursor = _Cursor(self.acked_through)

    def ack(self, seq: int) -> None:
        """Record `seq` as delivered (any order)."""
        if self.is_acknowledged(seq):
            return
        self._delivered.add(seq)
        self.pending -= 1
        self._state_dirty = True
        self._pop_prefix()

    def _pop_prefix(self) -> None:
        out = self._outstanding
        while out and out[0] in self._delivered:
            head = out.popleft()
            self._delivered.discard(head)
            self.acked_through = head
            self._state_dirty = True

    # ------------------------------------------------------------------ truncate

    def _drop_acknowledged_segments(self) -> None:
        """Delete segments whose records are all inside the durable acknowledged prefix.
        Called only right after the state was written (or loaded)."""
        if self._state_dirty:
            return
        removed = False
        while self._segments:
            seg = self._segments[0]
            if seg is self._writer_segment:
                break  # never the file being written (it is the last one)
            last = seg.last_seq
            if len(self._segments) > 1:
                # Records of it may be damaged lines after the last one read: up to the next.
                last = max(last, self._segments[1].first_seq - 1)
            if last > self.acked_through:
                break
            self._forget_segment(seg)
            removed = True
        if removed:
            _fsync_dir(self.directory)

    def _forget_segment(self, seg: _Segment) -> None:
        if self._cursor.index >= 0:
            # Segment indexes shift: find the place again from last_seq.
            self._cursor.close()
            self._cursor.index = -1
        self._segments.remove(seg)
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()

    def _compact(self) -> None:
        """Nothing pending and the state says so: remove every segment."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._writer_segment = None
            self._writer_size = 0
            self._unsynced = False
        self._cursor.close()
        for seg in list(self._segments):
            self._forget_segment(seg)
        self._cursor = _Cursor(self.acked_through)
        _fsync_dir(self.directory)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush(fsync=True)
            self.save()
        finally:
            self._closed = True
            self._cursor.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                self._writer_segment = None
            self._lock.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
