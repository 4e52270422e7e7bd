"""Writing one archive batch exactly once: intent, objects, progress (archiver.py has the
protocol), with the storage retry policy and, under `dead-letter`, the dead-letter path.

The consumer side (archiver.py) decides what a batch is; this module only stores it. Every
storage call goes through `StorageCalls.call`: retried with the project's backoff while the
consumer keeps polling with its partitions paused, abandoned (`Revoked`) as soon as the
partition is no longer ours, and given up (`retry.GaveUp`) only under the `dead-letter` policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from stockstream.archive import columnar, parquet
from stockstream.archive.manifest import Manifest, manifest_key
from stockstream.archive.object_store import ObjectStore
from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.quotes import QuoteValidator
from stockstream.deadletter import DeadLetters
from stockstream.errors import StockstreamError
from stockstream.metrics import (
    ARCHIVE_BLOCKED,
    ARCHIVE_BYTES,
    ARCHIVE_FAILURES,
    ARCHIVE_LAST_SUCCESS,
    ARCHIVE_OBJECTS,
    ARCHIVE_RECORDS,
    ARCHIVE_RETRIES,
    ARCHIVE_SKIPPED,
)
from stockstream.retry import Backoff, GaveUp, retry
from stockstream.settings import ArchiveSettings

log = logging.getLogger(__name__)

Owned = Callable[[], bool]
Sleep = Callable[[float], Awaitable[object]]


class Revoked(StockstreamError):
    """The partition was revoked while its batch was being written (its new owner redoes it)."""


@dataclass
class Encoded:
    """One Parquet object of a batch: its key, bytes and the offsets of its rows."""

    key: str
    data: bytes
    offsets: list[int]

    def log_fields(self, partition: int) -> dict[str, Any]:
        return {
            "partition": partition,
            "first_offset": self.offsets[0],
            "last_offset": self.offsets[-1],
            "key": self.key,
            "records": len(self.offsets),
        }


class StorageCalls:
    """Storage calls under the archive's retry policy (ARCHIVE_BACKOFF_*, ARCHIVE_MAX_RETRIES,
    ARCHIVE_FAILURE_POLICY), one at a time."""

    def __init__(self, conf: ArchiveSettings, store: ObjectStore, sleep: Sleep) -> None:
        self.conf = conf
        self.store = store
        self._sleep = sleep
        self._backoff = Backoff(conf.backoff_initial_seconds, conf.backoff_max_seconds)
        # One storage call at a time; a revocation waits for the running one (`idle`).
        self._io = asyncio.Lock()
        self._store_ready = False

    async def idle(self) -> None:
        """Return once no storage call is running."""
        async with self._io:
            pass

    async def call(
        self,
        operation: str,
        partition: int,
        owned: Owned,
        fn: Callable[..., Any],
        *args: Any,
        to_thread: bool = True,
        forever: bool = False,
    ) -> Any:
        """Run `fn` (in a thread for storage calls, awaited otherwise) until it succeeds.
        After ARCHIVE_MAX_RETRIES retries: the `block` policy (or `forever`) goes on at the
        maximum backoff with `stockstream_archive_blocked` at 1, `dead-letter` raises
        `GaveUp`. Raises `Revoked` once `owned()` is false."""
        conf = self.conf
        retried = 0

        async def attempt() -> Any:
            if not owned():
                raise Revoked()
            if to_thread:
                async with self._io:
                    if not self._store_ready:
                        await asyncio.to_thread(self.store.ensure_ready)
                        self._store_ready = True
                    return await asyncio.to_thread(fn, *args)
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        def failed(exc: BaseException, retries: int, pause: float) -> None:
            nonlocal retried
            retried = retries
            ARCHIVE_FAILURES.labels(operation).inc()
            ARCHIVE_RETRIES.inc()
            if retries > conf.max_retries and to_thread:
                ARCHIVE_BLOCKED.set(1)
            log.warning(
                "archive storage call failed, retrying",
                extra={
                    "operation": operation,
                    "partition": partition,
                    "attempt": retries,
                    "retry_in_s": round(pause, 3),
                    "store": self.store.describe() if to_thread else "kafka",
                    "error": repr(exc),
                },
            )

        gives_up = conf.failure_policy == "dead-letter" and not forever
        try:
            return await retry(
                attempt,
                self._backoff,
                what=operation,
                max_retries=conf.max_retries if gives_up else None,
                fatal=(Revoked,),
                on_failure=failed,
                sleep=self._sleep,
            )
        except GaveUp:
            ARCHIVE_FAILURES.labels(operation).inc()
            raise
        finally:
            if retried:
                ARCHIVE_BLOCKED.set(0)


class BatchWriter:
    """Stores one batch (a contiguous offset range of one partition) as Parquet objects."""

    def __init__(
        self,
        topic: str,
        conf: ArchiveSettings,
        calls: StorageCalls,
        validator: QuoteValidator,
        max_future_ms: int,
        dead_letters: DeadLetters,
    ) -> None:
        self.topic = topic
        self.conf = conf
        self.calls = calls
        self.store = calls.store
        self.validator = validator
        # The validator's QUOTE_MAX_FUTURE_SECONDS, for the column-wise checks.
        self.max_future_ms = max_future_ms
        self.dead_letters = dead_letters

    def encode(self, records: Sequence[Any]) -> tuple[list[Encoded], list[tuple[int, str]]]:
        """The batch's objects, and (offset, error) of the valid quotes Parquet refused (pure,
        deterministic: a re-written batch gives the same keys and bytes; run in a thread).
        Column-wise (columnar.py): the Python work per record is what the
        aggregation in the same process waits for, the Arrow work runs without the GIL.

        The contract bounds every field, so a valid quote always encodes; should one not, it
        is taken out (and dead-lettered by `write`) instead of failing the batch forever."""
        table, rejected = columnar.parse_table(records, self.validator, self.max_future_ms)
        for _, exc in rejected:
            ARCHIVE_SKIPPED.labels(exc.reason.value).inc()
        encoded: list[Encoded] = []
        refused: list[tuple[int, str]] = []
        for key, group in columnar.split_table(self.topic, table):
            offsets = group.column("kafka_offset").to_pylist()
            try:
                encoded.append(Encoded(key, parquet.encode_table(group), offsets))
                continue
            except Exception:  # pyarrow's errors are many types
                pass
            kept = []
            for i, offset in enumerate(offsets):
                try:
                    parquet.encode_table(group.slice(i, 1))
                except Exception as exc:
                    refused.append((offset, f"{type(exc).__name__}: {exc}"))
                else:
                    kept.append(i)
            survivors = group.take(pa.array(kept, type=pa.int64()))
            encoded.extend(
                Encoded(k, parquet.encode_table(g), g.column("kafka_offset").to_pylist())
                for k, g in columnar.split_table(self.topic, survivors)
            )
        return encoded, refused

    async def write(
        self, partition: int, through: int, records: list[Any], forced: bool, owned: Owned
    ) -> None:
        """Intent (unless `forced`: re-doing a crashed batch whose intent is stored), objects,
        progress. Objects that cannot be stored under the `dead-letter` policy have their
        records dead-lettered (delivered before this returns)."""
        first, last = records[0].offset, records[-1].offset
        encoded, refused = await asyncio.to_thread(self.encode, records)
        if refused:
            await self._reject(partition, owned, records, refused)
        if not encoded:
            return
        mkey = manifest_key(self.topic, partition)
        failed: list[Encoded] = []
        error = ""
        storage_down = False
        if not forced:
            intent = Manifest(through, (first, last), tuple(e.key for e in encoded))
            try:
                await self._put_manifest(partition, owned, mkey, intent)
            except GaveUp as exc:
                storage_down, error = True, f"put-manifest: {exc.last!r}"
        for item in encoded:
            # Once storage gave up, the rest fails without waiting out the retries again.
            if not storage_down:
                try:
                    await self.calls.call(
                        "put-object",
                        partition,
                        owned,
                        self.store.put,
                        item.key,
                        item.data,
                        parquet.CONTENT_TYPE,
                    )
                except GaveUp as exc:
                    storage_down, error = True, f"put-object: {exc.last!r}"
                else:
                    self._stored(partition, item)
                    continue
            failed.append(item)
        if failed:
            await self._dead_letter(partition, owned, records, failed, error)
        if len(failed) < len(encoded):
            try:
                await self._put_manifest(partition, owned, mkey, Manifest(last))
            except GaveUp:
                # Not needed for correctness (the commit that follows moves the start past
                # this batch), so a give-up here is only logged.
                log.error(
                    "archive manifest not updated", extra={"partition": partition, "through": last}
                )
        if not failed:
            ARCHIVE_LAST_SUCCESS.set(time.time())

    async def _put_manifest(
        self, partition: int, owned: Owned, key: str, manifest: Manifest
    ) -> None:
        await self.calls.call(
            "put-manifest",
            partition,
            owned,
            self.store.put,
            key,
            manifest.dumps(self.topic, partition),
            "application/json",
        )

    @staticmethod
    def _stored(partition: int, item: Encoded) -> None:
        ARCHIVE_OBJECTS.inc()
        ARCHIVE_RECORDS.inc(len(item.offsets))
        ARCHIVE_BYTES.inc(len(item.data))
        log.info("archived object", extra={**item.log_fields(partition), "bytes": len(item.data)})

    async def _reject(
        self, partition: int, owned: Owned, records: list[Any], refused: list[tuple[int, str]]
    ) -> None:
        """Dead-letter (reason archive-rejected) valid quotes that cannot be encoded."""
        errors = dict(refused)
        chosen = [r for r in records if r.offset in errors]
        for record in chosen:
            log.error(
                "archive cannot encode a valid quote; dead-lettered",
                extra={
                    "partition": partition,
                    "offset": record.offset,
                    "error": errors[record.offset],
                },
            )

        async def deliver() -> None:
            deliveries = [
                await self.dead_letters.send(
                    r, Reason.ARCHIVE_REJECTED, f"not encodable: {errors[r.offset]}"
                )
                for r in chosen
            ]
            await asyncio.gather(*deliveries)

        await self.calls.call(
            "dead-letter", partition, owned, deliver, to_thread=False, forever=True
        )

    async def _dead_letter(
        self, partition: int, owned: Owned, records: list[Any], failed: list[Encoded], error: str
    ) -> None:
        offsets = {o for item in failed for o in item.offsets}
        chosen = [r for r in records if r.offset in offsets]
        message = f"archive write failed after {self.conf.max_retries} retries: {error}"

        async def deliver() -> None:
            deliveries = await self.dead_letters.send_many(chosen, Reason.ARCHIVE_FAILED, message)
            await asyncio.gather(*deliveries)

        # The DLQ is Kafka, not the failing storage: keep trying until it has the records,
        # since the offsets are committed right after.
        await self.calls.call(
            "dead-letter", partition, owned, deliver, to_thread=False, forever=True
        )
        for item in failed:
            log.warning(
                "archive dead-lettered records",
                extra={
                    **item.log_fields(partition),
                    "reason": Reason.ARCHIVE_FAILED.value,
                    "error": error,
                },
            )
