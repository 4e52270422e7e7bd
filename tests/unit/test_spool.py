"""The local spool (stockstream/producer/spool.py and its line format, spool_format.py):
order, acknowledgement, truncation, crash safety."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockstream.producer.spool import (
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    STATE_FILE,
    Spool,
    SpoolLockedError,
)
from stockstream.producer.spool_format import SpoolRecord, decode_line, encode_line


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SEGMENT_PREFIX}*.jsonl"))


def crash(spool: Spool) -> None:
    """Simulate the process dying: no flush, no state write; the OS keeps what was written."""
    spool._cursor.close()
    if spool._writer is not None:
        spool._writer.close()  # its Python buffer is empty: _write_buffer flushes it
    spool._buffer.clear()
    spool._closed = True
    spool._lock.close()


def values(records: list[SpoolRecord]) -> list[bytes]:
    return [r.value for r in records]


def fill(spool: Spool, n: int, start: int = 0) -> list[int]:
    return [
        spool.append(f"S{i % 3}".encode(), b'{"n":%d}' % i, 1000 + i)
        for i in range(start, start + n)
    ]


def test_append_then_read_in_order(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        seqs = fill(spool, 5)
        assert seqs == [1, 2, 3, 4, 5]
        assert spool.pending == 5
        got = spool.read(100)
        assert [r.seq for r in got] == seqs
        assert values(got) == [b'{"n":%d}' % i for i in range(5)]
        assert got[0] == SpoolRecord(1, b"S0", b'{"n":0}', 1000)
        # Read again: nothing new until appended.
        assert spool.read(100) == []
        fill(spool, 2, start=5)
        assert [r.seq for r in spool.read(100)] == [6, 7]


def test_read_respects_limit(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 10)
        assert [r.seq for r in spool.read(4)] == [1, 2, 3, 4]
        assert [r.seq for r in spool.read(4)] == [5, 6, 7, 8]
        assert [r.seq for r in spool.read(4)] == [9, 10]


def test_records_survive_a_clean_restart(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 3)
    with Spool(tmp_path) as spool:
        assert spool.pending == 3
        assert [r.seq for r in spool.read(10)] == [1, 2, 3]
        assert spool.next_seq == 4
        assert spool.append(b"X", b"{}") == 4  # new segment, numbering continues
        spool.flush()
        assert len(segments(tmp_path)) == 2
        assert [r.seq for r in spool.read(10)] == [4]


def test_ack_all_removes_every_segment_and_keeps_numbering(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 4)
        for record in spool.read(10):
            spool.ack(record.seq)
        assert spool.pending == 0
        spool.save()
        assert segments(tmp_path) == []
        assert spool.acked_through == 4
    with Spool(tmp_path) as spool:
        assert spool.pending == 0
        assert spool.read(10) == []
        assert spool.append(b"X", b"{}") == 5


def test_partial_ack_then_crash_resends_only_unacknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 6)
    got = spool.read(10)
    # Acknowledged out of order (different partitions): 1, 3, 4, 6.
    for seq in (3, 1, 6, 4):
        spool.ack(seq)
    assert spool.acked_through == 1
    assert spool.delivered == {3, 4, 6}
    spool.flush()
    spool.save()
    crash(spool)
    with Spool(tmp_path) as spool:
        assert spool.pending == 2
        assert [r.seq for r in spool.read(10)] == [2, 5]
    assert len(got) == 6


def test_acks_not_yet_saved_are_resent_after_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 3)
    spool.flush()
    spool.save()
    for record in spool.read(10):
        spool.ack(record.seq)
    crash(spool)  # the acknowledgements were never written
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.read(10)] == [1, 2, 3]


def test_unsynced_appends_are_lost_on_crash_but_nothing_breaks(tmp_path: Path) -> None:
    spool = Spool(tmp_path, buffer_bytes=1 << 20)
    fill(spool, 3)
    spool.flush()
    fill(spool, 2, start=3)  # still in the process buffer
    crash(spool)
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.read(10)] == [1, 2, 3]
        assert spool.issues == []


def test_partial_last_line_is_skipped_and_reported(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 3)
    spool.flush()
    crash(spool)
    [segment] = segments(tmp_path)
    line = encode_line(SpoolRecord(4, b"S1", b'{"n":3}', 1003))
    with open(segment, "ab") as f:
        f.write(line[: len(line) // 2])  # the process died in the middle of this write
    with Spool(tmp_path) as spool:
        assert len(spool.issues) == 1
        issue = spool.issues[0]
        assert issue.segment == segment.name
        assert "partial" in issue.reason
        assert spool.pending == 3
        assert [r.seq for r in spool.read(10)] == [1, 2, 3]
        # New records go to a fresh segment, never glued to the damaged line.
        assert spool.append(b"S0", b'{"n":9}') == 4
        assert [(r.seq, r.value) for r in spool.read(10)] == [(4, b'{"n":9}')]
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.read(10)] == [1, 2, 3, 4]


def test_damaged_line_in_the_middle_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 3)
    spool.flush()
    crash(spool)
    [segment] = segments(tmp_path)
    lines = segment.read_bytes().splitlines(keepends=True)
    segment.write_bytes(lines[0] + b'{"s": 2, "k": "S1", "v\n' + lines[2])
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.read(10)] == [1, 3]
        assert len(spool.issues) == 1
        # The prefix can still move past the missing record.
        spool.ack(1)
        spool.ack(3)
        assert spool.acked_through == 3
        assert spool.pending == 0


def test_segments_rotate_and_only_acknowledged_ones_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=200, buffer_bytes=1)
    fill(spool, 20)
    spool.flush()
    many = segments(tmp_path)
    assert len(many) > 3
    got = spool.read(100)
    assert [r.seq for r in got] == list(range(1, 21))
    for record in got[:10]:
        spool.ack(record.seq)
    spool.save()
    left = segments(tmp_path)
    assert 0 < len(left) < len(many)
    first_left = int(left[0].name[len(SEGMENT_PREFIX) : -len(".jsonl")])
    assert first_left <= 11  # the segment holding seq 11 is kept
    crash(spool)
    with Spool(tmp_path, segment_bytes=200, buffer_bytes=1) as spool:
        assert [r.seq for r in spool.read(100)] == list(range(11, 21))


def test_rewind_hands_out_unacknowledged_records_again(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 5)
        assert [r.seq for r in spool.read(3)] == [1, 2, 3]
        spool.ack(1)
        spool.ack(3)
        spool.rewind()
        assert [r.seq for r in spool.read(10)] == [2, 4, 5]


def test_ack_beyond_the_cursor_is_skipped_when_read(tmp_path: Path) -> None:
    """Records found already delivered (reconciliation) are acknowledged before being read."""
    with Spool(tmp_path) as spool:
        fill(spool, 5)
        spool.ack(2)
        spool.ack(3)
        assert spool.pending == 3
        got = spool.read(10)
        assert [r.seq for r in got] == [1, 4, 5]
        for record in got:
            spool.ack(record.seq)
        assert spool.acked_through == 5
        assert spool.delivered == frozenset()


def test_scan_does_not_move_the_read_cursor(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 5)
        spool.ack(2)
        assert [r.seq for r in spool.scan(upto=4)] == [1, 3, 4]
        assert [r.seq for r in spool.read(10)] == [1, 3, 4, 5]


def test_meta_is_saved_with_the_state(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 2)
        spool.save({"sent_upto": 2, "floors": {"0": 17}})
    with Spool(tmp_path) as spool:
        assert spool.meta == {"sent_upto": 2, "floors": {"0": 17}}
    state = orjson.loads((tmp_path / STATE_FILE).read_bytes())
    assert state["meta"]["floors"] == {"0": 17}


def test_unreadable_state_is_reported_and_everything_stays_pending(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        fill(spool, 3)
        spool.ack(1)
    (tmp_path / STATE_FILE).write_bytes(b"{garbage")
    with Spool(tmp_path) as spool:
        assert [i.segment for i in spool.issues] == [STATE_FILE]
        assert [r.seq for r in spool.read(10)] == [1, 2, 3]  # duplicates, not losses


def test_second_owner_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolLockedError):
        Spool(tmp_path)
    with Spool(tmp_path):  # released on close
        pass


def test_binary_keys_and_values_round_trip(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        spool.append(b"\xff\xfe", b"\x00\x80binary", None)
        spool.append(None, "ünïcode ✓".encode(), 5)
    with Spool(tmp_path) as spool:
        a, b = spool.read(10)
        assert (a.key, a.value, a.timestamp_ms) == (b"\xff\xfe", b"\x00\x80binary", None)
        assert (b.key, b.value, b.timestamp_ms) == (None, "ünïcode ✓".encode(), 5)


def test_decode_line_rejects_damage() -> None:
    good = encode_line(SpoolRecord(7, b"K", b"V", 1))[:-1]
    assert decode_line(good) == SpoolRecord(7, b"K", b"V", 1)
    for bad in (b"", b"[1]", b'{"s": 0, "v": "x"}', b'{"s": 1}', b'{"s": 1, "vb": "!!"}'):
        with pytest.raises(ValueError):
            decode_line(bad)


@pytest.mark.parametrize("seed", range(8))
def test_random_appends_acks_and_crashes_keep_order_and_lose_nothing(
    tmp_path: Path, seed: int
) -> None:
    """Whatever the interleaving: every appended-and-flushed record that was not acknowledged
    (durably) comes back, in append order, and nothing durably acknowledged comes back."""
    rng = random.Random(seed)
    durable_acked: set[int] = set()
    appended: list[int] = []  # flushed, in order
    spool = Spool(tmp_path, segment_bytes=300, buffer_bytes=64)
    acked_since_save: set[int] = set()
    for _ in range(300):
        action = rng.random()
        if action < 0.45:
            for _ in range(rng.randint(1, 5)):
                appended.append(spool.append(b"K", b"v%d" % len(appended), None))
            spool.flush(fsync=False)  # written to the OS, which survives a process crash
        elif action < 0.75:
            for record in spool.read(rng.randint(1, 6)):
                if rng.random() < 0.7:
                    spool.ack(record.seq)
                    acked_since_save.add(record.seq)
        elif action < 0.85:
            spool.rewind()
        elif action < 0.95:
            spool.save()
            durable_acked |= acked_since_save
            acked_since_save.clear()
        else:
            crash(spool)
            acked_since_save.clear()
            spool = Spool(tmp_path, segment_bytes=300, buffer_bytes=64)
            assert spool.issues == []
    spool.flush()
    spool.save()
    durable_acked |= acked_since_save
    crash(spool)
    with Spool(tmp_path, segment_bytes=300, buffer_bytes=64) as spool:
        left = [r.seq for r in spool.read(10_000)]
    assert left == sorted(left)
    assert set(left) == set(appended) - durable_acked


# ----------------------------------------------------------- segments left behind by a power cut
#
# `_rotate` creates the file of a new segment (and fsyncs the directory) before the records are
# written into it; they reach the disk only with the next fsync. A power cut in between leaves
# a file named after the next sequence number that is empty or holds the start of a line.


def segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


TORN = {
    "empty": b"",
    "partial-line": encode_line(SpoolRecord(4, b"S0", b'{"n":3}', 1003))[:17],
    "zero-filled": b"\0" * 24,
    "zero-filled-line": b"\0" * 23 + b"\n",
}


def spool_with_torn_segment(directory: Path, torn: bytes, at: int = 4) -> None:
    """Records 1..3 durable, then a power cut after the segment `at` was created."""
    spool = Spool(directory)
    fill(spool, 3)
    spool.flush()
    crash(spool)
    segment_path(directory, at).write_bytes(torn)


@pytest.mark.parametrize("torn", TORN.values(), ids=TORN.keys())
def test_segment_torn_by_a_power_cut_never_takes_new_records_with_it(
    tmp_path: Path, torn: bytes
) -> None:
    spool_with_torn_segment(tmp_path, torn)
    spool = Spool(tmp_path)
    assert spool.next_seq == 4
    assert spool.pending == 3
    assert [r.seq for r in spool.read(10)] == [1, 2, 3]
    fill(spool, 3, start=3)  # 4..6: a new segment under the torn one's name
    spool.flush()
    assert [(r.seq, r.value) for r in spool.read(10)] == [
        (4, b'{"n":3}'),
        (5, b'{"n":4}'),
        (6, b'{"n":5}'),
    ]
    for seq in (1, 2, 3):
        spool.ack(seq)
    spool.save()  # the segment of 1..3 goes; the one being written must stay
    fill(spool, 2, start=6)  # 7, 8: the drain goes on
    spool.flush()
    assert [r.seq for r in spool.read(10)] == [7, 8]
    assert [r.seq for r in spool.scan(upto=100)] == [4, 5, 6, 7, 8]
    spool.ack(4)
    spool.save()
    crash(spool)
    with Spool(tmp_path) as spool:
        assert spool.pending == 4
        assert [(r.seq, r.value) for r in spool.read(10)] == [
            (5, b'{"n":4}'),
            (6, b'{"n":5}'),
            (7, b'{"n":6}'),
            (8, b'{"n":7}'),
        ]


@pytest.mark.parametrize("torn", TORN.values(), ids=TORN.keys())
def test_records_written_after_a_power_cut_survive_a_clean_restart(
    tmp_path: Path, torn: bytes
) -> None:
    spool_with_torn_segment(tmp_path, torn)
    with Spool(tmp_path) as spool:
        fill(spool, 3, start=3)  # 4..6
        spool.flush()
        for record in spool.read(3):
            spool.ack(record.seq)
    # close() saved the acknowledgement of 1..3 and deleted what it covers.
    with Spool(tmp_path) as spool:
        assert spool.pending == 3
        assert [r.seq for r in spool.read(10)] == [4, 5, 6]
        assert spool.issues == []  # the torn file is gone, not met again


@pytest.mark.parametrize("torn", TORN.values(), ids=TORN.keys())
def test_segment_torn_by_a_power_cut_is_removed_when_the_spool_opens(
    tmp_path: Path, torn: bytes
) -> None:
    spool_with_torn_segment(tmp_path, torn)
    with Spool(tmp_path) as spool:
        name = segment_path(tmp_path, 4).name
        assert [i.segment for i in spool.issues if "no record" in i.reason] == [name]
        assert not segment_path(tmp_path, 4).exists()
        assert [r.seq for r in spool.read(10)] == [1, 2, 3]
        assert spool.append(b"S0", b'{"n":9}') == 4
        spool.flush()
        # A new file, not the torn one appended to: the new record is readable.
        assert segment_path(tmp_path, 4).read_bytes() == encode_line(
            SpoolRecord(4, b"S0", b'{"n":9}', None)
        )
        assert [r.seq for r in spool.read(10)] == [4]


def test_new_segments_never_append_to_a_file_left_under_a_later_name(tmp_path: Path) -> None:
    """A torn file whose name the numbering reaches only later (here: 6, next is 4)."""
    spool_with_torn_segment(tmp_path, TORN["partial-line"], at=6)
    with Spool(tmp_path, segment_bytes=1, buffer_bytes=1) as spool:  # a segment per record
        fill(spool, 5, start=3)  # 4..8: segments 4, 5, 6, 7, 8
        spool.flush()
        assert [r.seq for r in spool.read(10)] == [1, 2, 3, 4, 5, 6, 7, 8]
        for seq in (1, 2, 3, 4, 5):
            spool.ack(seq)
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.read(10)] == [6, 7, 8]
        assert spool.issues == []


def test_a_torn_segment_below_the_saved_next_number_is_removed_too(tmp_path: Path) -> None:
    """The state was saved after 4 and 5 went to a new segment, the power cut lost them: new
    records start at 6, and the torn segment (4) holds nothing anybody waits for."""
    spool = Spool(tmp_path, segment_bytes=1, buffer_bytes=1 << 16)
    fill(spool, 3)
    spool.flush()  # 1..3 durable in segment 1
    fill(spool, 2, start=3)
    # Handed out (the producer's write-ahead): 4, 5 go to segment 4 (not fsync'd) and the
    # state, with next 6, is written.
    spool.save({"sent_upto": 5})
    crash(spool)
    segment_path(tmp_path, 4).write_bytes(TORN["partial-line"])  # the power cut
    with Spool(tmp_path) as spool:
        assert not segment_path(tmp_path, 4).exists()
        assert spool.next_seq == 6
        fill(spool, 2, start=5)  # 6, 7
        got = spool.read(10)
        assert [r.seq for r in got] == [1, 2, 3, 6, 7]
        for record in got[:4]:
            spool.ack(record.seq)
    with Spool(tmp_path) as spool:
        assert [r.seq for r in spool.read(10)] == [7]


# ------------------------------------------------------------- random power cuts (property)


def power_cut(spool: Spool, durable: dict[str, int], data: st.DataObject) -> None:
    """The machine loses power: every segment keeps what was fsync'd (`durable`, sizes at the
    last fsync) and, of what was only written, a random prefix, possibly zero-filled; files
    created after the last fsync may come back empty. The state file is replaced atomically,
    so it is whatever was last saved."""
    crash(spool)
    for path in segments(spool.directory):
        content = path.read_bytes()
        keep = min(len(content), durable.get(path.name, 0))
        torn = data.draw(st.integers(0, len(content) - keep), label=f"torn {path.name}")
        tail = content[keep : keep + torn]
        if tail and data.draw(st.booleans(), label="zero-filled"):
            tail = b"\0" * len(tail)
        path.write_bytes(content[:keep] + tail)


def sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in segments(directory)}


OPS = st.sampled_from(["append", "append+fsync", "read", "save", "rewind", "power cut"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from([1, 1 << 16]))
def test_power_cuts_with_torn_tails_never_lose_or_repeat_a_durable_record(
    data: st.DataObject, buffer_bytes: int
) -> None:
    """Appends, fsyncs, reads, acknowledgements, saves and power cuts in any order: every
    record that was fsync'd and not durably acknowledged comes back after each power cut and
    is never deleted; within a read pass no record comes twice or out of order, none is
    skipped; acknowledged ones never come back."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)

        def open_spool() -> Spool:
            return Spool(directory, segment_bytes=120, buffer_bytes=buffer_bytes)

        spool = open_spool()
        live: dict[int, bytes] = {}  # seq -> value: records that exist (or may: not fsync'd)
        durable: set[int] = set()  # records on the disk for sure
        acked: set[int] = set()  # durably acknowledged
        acked_unsaved: set[int] = set()
        durable_sizes: dict[str, int] = {}
        passed = 0  # highest seq handed out in this read pass
        counter = 0

        def check_all_there() -> None:
            left = spool.scan(upto=1 << 40)
            assert [r.seq for r in left] == sorted(
                s for s in live if s not in acked | acked_unsaved
            )
            assert all(live[r.seq] == r.value for r in left)

        for _ in range(data.draw(st.integers(1, 40), label="steps")):
            op = data.draw(OPS, label="op")
            if op.startswith("append"):
                for _ in range(data.draw(st.integers(1, 4), label="n")):
                    counter += 1
                    seq = spool.append(b"K", b"v%d" % counter)
                    assert seq not in live
                    live[seq] = b"v%d" % counter
                if op == "append+fsync":
                    spool.flush(fsync=True)
                    durable = set(live)
                    durable_sizes = sizes(directory)
            elif op == "read":
                limit = data.draw(st.integers(1, 6), label="limit")
                got = spool.read(limit)
                for record in got:
                    assert live.get(record.seq) == record.value
                    assert record.seq > passed  # in order, never twice in a pass
                    skipped = {s for s in live if passed < s < record.seq}
                    assert skipped <= acked | acked_unsaved  # none skipped
                    passed = record.seq
                    if data.draw(st.booleans(), label="ack"):
                        spool.ack(record.seq)
                        acked_unsaved.add(record.seq)
                if len(got) < limit:  # caught up: nothing unacknowledged left behind
                    assert {s for s in live if s > passed} <= acked | acked_unsaved
            elif op == "save":
                spool.save()
                acked |= acked_unsaved
                acked_unsaved.clear()
                check_all_there()
            elif op == "rewind":
                spool.rewind()
                passed = 0
            else:
                power_cut(spool, durable_sizes, data)
                acked_unsaved.clear()
                spool = open_spool()
                present = {r.seq: r.value for r in spool.scan(upto=1 << 40)}
                assert spool.pending == len(present)
                assert all(live.get(seq) == value for seq, value in present.items())
                assert not present.keys() & acked
                assert {s for s in durable if s not in acked} <= present.keys()
                # What the power cut took was never fsync'd; its numbers may be given again.
                live = {s: v for s, v in live.items() if s in present or s in acked}
                durable = set(live)
                durable_sizes = sizes(directory)
                passed = 0
        spool.close()
        acked |= acked_unsaved
        with open_spool() as spool:
            left = spool.read(1 << 20)
            assert [r.seq for r in left] == sorted(s for s in live if s not in acked)
            assert all(live[r.seq] == r.value for r in left)
