"""Per-partition progress of the archive, stored as a small JSON object beside the data.

`_progress/<topic>/partition-<p>.json` records what the archive has handled (`through`) and,
while a batch is being written, its exact boundaries (`pending`: first and last offset, and the
object keys). That intent is what makes a re-write after a crash exact: the restarted archive
cuts its first batch at the same offsets and re-creates the same keys with the same bytes
(archiver.py, "Exactly once in the archive").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson

from stockstream.contracts.timestamps import iso_utc

log = logging.getLogger(__name__)


def manifest_key(topic: str, partition: int) -> str:
    return f"_progress/{topic}/partition-{partition}.json"


@dataclass(frozen=True)
class Manifest:
    """Handled through offset `through`; `pending` = the batch being written, if any."""

    through: int = -1
    pending: tuple[int, int] | None = None
    keys: tuple[str, ...] = ()

    def dumps(self, topic: str, partition: int) -> bytes:
        pending = None
        if self.pending is not None:
            pending = {"first": self.pending[0], "last": self.pending[1], "keys": list(self.keys)}
        return orjson.dumps(
            {
                "topic": topic,
                "partition": partition,
                "through": self.through,
                "pending": pending,
                "updated_at": iso_utc(int(time.time() * 1000)),
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def loads(cls, data: bytes) -> Manifest:
        body = orjson.loads(data)
        pending = body.get("pending")
        if pending:
            return cls(
                int(body["through"]),
                (int(pending["first"]), int(pending["last"])),
                tuple(pending.get("keys", ())),
            )
        return cls(int(body["through"]))


def load_manifest(data: bytes, key: str) -> Manifest | None:
    """The manifest in `data`, or None when it cannot be read."""
    try:
        return Manifest.loads(data)
    except (ValueError, KeyError, TypeError) as exc:
        # Writes are atomic, so only a hand-edited object gets here: trust the Kafka commit.
        log.error("archive manifest unreadable, ignored", extra={"key": key, "error": repr(exc)})
        return None
