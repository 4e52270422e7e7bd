"""How a contender tells the harness how far it got: the count of records it processed,
rewritten in place in a small file (the harness polls it and the process's CPU time).

No dependencies: the Quix Streams contender imports it from its own virtualenv."""

from __future__ import annotations

import os
import time


class Progress:
    def __init__(self, path: str | None, expected: int = 0) -> None:
        self.count = 0
        self.expected = expected
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if path else None
        self._written_at = 0.0

    def add(self, records: int, *, force: bool = False) -> None:
        """Count `records`; the file is rewritten at most every 50 ms (a write per record
        would be a cost no contender has), and when the expected count is reached."""
        self.count += records
        now = time.monotonic()
        done = self.expected and self.count >= self.expected
        if self._fd is not None and (force or done or now - self._written_at >= 0.05):
            self._written_at = now
            os.pwrite(self._fd, f"{self.count:<20d}\n".encode(), 0)

    @classmethod
    def from_env(cls) -> Progress:
        return cls(os.environ.get("BENCH_PROGRESS"), int(os.environ.get("BENCH_EXPECT", "0")))


def read(path: str) -> int:
    """The count a contender last wrote (0 before its first write)."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).strip()
    except FileNotFoundError:
        return 0
    return int(text) if text else 0
