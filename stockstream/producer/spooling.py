"""The quote producer's side of its spool: what goes in, what it counts, and the baseline.

Records reach the spool two ways: queued behind what is already spooled (never sent), or
taken from a session that failed (in doubt: they may have gone out). Before in-doubt records
are written, and before spooled records are handed to a session, the reconciliation baseline
(reconcile.py: `sent_upto`, `floors`, `partitions` in the spool's `meta`) is made durable,
so a crash in between only over-approximates what is in doubt. Records that can be neither
delivered nor spooled (a spool write error, a record Kafka refuses for good) are counted
here as lost. None of this changes the producer's mode or session; that is quote_producer.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stockstream.producer.instruments import ProducerInstruments
from stockstream.producer.session import Session, symbol
from stockstream.producer.spool import Spool

log = logging.getLogger(__name__)


class SpoolKeeper:
    """Owns the producer's `Spool` (opened by `open()`) and counts `spooled`, `rejected` and
    `spool_errors`."""

    def __init__(self, path: Path, topic: str, instruments: ProducerInstruments) -> None:
        self.path = path
        self._topic = topic
        self._m = instruments
        self.spool: Spool | None = None
        self.spooled = 0
        self.rejected = 0
        self.spool_errors = 0

    @property
    def pending(self) -> int:
        return 0 if self.spool is None else self.spool.pending

    def open(self) -> Spool:
        self.spool = spool = Spool(self.path)  # raises SpoolLockedError if in use
        if spool.issues:
            self._m.spool_damaged.inc(len(spool.issues))
        return spool

    def queue(self, key: bytes | None, value: bytes, timestamp_ms: int | None) -> None:
        """Append a record that was never sent (it waits behind the spool)."""
        assert self.spool is not None
        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        try:
            seq = self.spool.append(key, value, ts)
        except OSError as exc:
            self._error([key], exc)
            return
        self.spooled += 1
        self._m.spooled["queued"].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "spooled",
                extra={"topic": self._topic, "symbol": symbol(key), "spool_seq": seq},
            )

    def in_doubt(self, records: list[tuple[bytes | None, bytes, int]], session: Session) -> None:
        """Append records that a (now dead) session may have sent, behind what is spooled.
        The baseline that lets the next session find them in the topic is made durable
        first; a crash in between only over-approximates what is in doubt."""
        spool = self.spool
        assert spool is not None
        try:
            meta = dict(spool.meta)
            if session.baseline:
                meta["floors"] = session.floors_json()
                meta["partitions"] = len(session.partitions)
            if records:
                meta["sent_upto"] = max(
                    int(meta.get("sent_upto", 0)), spool.next_seq + len(records) - 1
                )
            spool.save(meta)
            for key, value, ts in records:
                spool.append(key, value, ts)
            spool.flush(fsync=True)
        except OSError as exc:
            self._error([r[0] for r in records], exc)
            return
        self.spooled += len(records)
        if records:
            self._m.spooled["failed"].inc(len(records))

    def set_baseline(self, session: Session) -> None:
        """Make `session` the spool's reconciliation baseline: nothing in the spool has been
        handed to it yet. Durable before it gets any spooled record."""
        spool = self.spool
        assert spool is not None
        spool.save(
            {
                "sent_upto": spool.acked_through,
                "floors": session.floors_json(),
                "partitions": len(session.partitions),
            }
        )
        session.baseline = True

    def hand_out(self, session: Session, upto: int) -> None:
        """Write-ahead: the baseline covers spooled records up to `upto` before any of them
        goes to `session`."""
        spool = self.spool
        assert spool is not None
        spool.save({**spool.meta, "sent_upto": upto, "floors": session.floors_json()})

    def _error(self, keys: list[bytes | None], exc: OSError) -> None:
        self.spool_errors += len(keys)
        self._m.failed["spool_error"].inc(len(keys))
        for key in keys:
            log.error(
                "record lost: could not write it to the spool",
                extra={
                    "topic": self._topic,
                    "symbol": symbol(key),
                    "error": repr(exc),
                    "spool": str(self.path),
                },
            )

    def reject(self, key: bytes | None, seq: int | None, exc: BaseException) -> None:
        self.rejected += 1
        self._m.failed["rejected"].inc()
        log.error(
            "record rejected by Kafka and dropped",
            extra={
                "topic": self._topic,
                "symbol": symbol(key),
                "error": repr(exc),
                "spool_seq": seq,
            },
        )
        if seq is not None and self.spool is not None:
            self.spool.ack(seq)  # it can never be delivered; do not block the spool on it

    def persist(self, live: Session | None) -> None:
        """fsync appended records and write the acknowledgement state (with the current
        floors when the `live` session is the baseline)."""
        spool = self.spool
        assert spool is not None
        try:
            spool.flush(fsync=True)
            if spool.state_dirty or spool.pending == 0:
                meta = None
                if live is not None and not live.dead and live.baseline:
                    meta = {
                        **spool.meta,
                        "floors": live.floors_json(),
                        "partitions": len(live.partitions),
                    }
                spool.save(meta)
        except OSError as exc:
            log.error(
                "spool write failed",
                extra={"topic": self._topic, "spool": str(self.path), "error": repr(exc)},
            )
