"""The alert service: `stock-anomalies` -> one receiver, as a `ConsumerService`
(kafka/consumer_service.py) inside the worker.

One consumer group per receiver (`<app id>-alerts-slack`, `<app id>-alerts-pagerduty`), not
one for both: each receiver then has its own position, so a Slack outage never holds back a
page, and "delivered to this receiver" is exactly "committed in this receiver's group" (no
per-record bookkeeping of which receiver already has it).

Per record, in partition order:

1. decode it with the contract (`parse_anomaly`); a record that is not a UTF-8 JSON object is
   dead-lettered as `malformed`, one that breaks the contract as `invalid` (by one service
   only, so one dead letter per record);
2. deliver it (sender.py: rate limit, retries with backoff, Retry-After). While it waits the
   service keeps polling with its partitions paused, so the group keeps it and Kafka keeps the
   data (`stockstream_alert_pending` stays up);
3. given up on (refused, or retries exhausted) -> dead-lettered with reason `alert-failed` and
   the receiver's last error; nothing is lost silently and the service goes on;
4. commit the record's offset, only now (after the dead letter was acknowledged, if any).

Duplicates: the offset is committed after every record, so a crash can repeat at most the
anomaly in flight. PagerDuty merges a repeat into the same alert (`dedup_key` = the anomaly's
identity); identities this process delivered are remembered (the last `_REMEMBERED`), so a
re-read after a failed commit, or a re-driven dead letter that one receiver already had, is not
sent again (`stockstream_alert_deliveries_total{outcome="duplicate"}`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import Any

import orjson
from aiokafka import TopicPartition

from stockstream.alerts.receivers import Receiver, receivers_from_settings
from stockstream.alerts.sender import Abandoned, AlertFailed, AlertSender
from stockstream.contracts.anomalies import AnomalyRecordError, anomaly_identity, parse_anomaly
from stockstream.contracts.dead_letters import Reason
from stockstream.deadletter import DeadLetters, SourceRecord
from stockstream.kafka.consumer_service import ConsumerService
from stockstream.metrics import ALERT_DELIVERIES, ALERT_PENDING
from stockstream.settings import Settings

log = logging.getLogger(__name__)

#: An anomaly record is under 1 KB; anything far larger is not one (and is not parsed).
MAX_RECORD_BYTES = 64 * 1024
#: Records fetched per poll (delivered one by one; rate limits make a large batch pointless).
_BATCH_RECORDS = 50
_REMEMBERED = 10_000

Identity = tuple[str, int, str]


def decode_anomaly(value: bytes | None) -> tuple[dict[str, Any] | None, Reason, str]:
    """(anomaly, _, _) for a valid record, else (None, reason, error) to dead-letter it."""
    if value is None:
        return None, Reason.MALFORMED, "empty value (tombstone)"
    if len(value) > MAX_RECORD_BYTES:
        return None, Reason.INVALID, f"{len(value)} bytes: too large for an anomaly record"
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return None, Reason.MALFORMED, f"not UTF-8 JSON: {exc}"
    if not isinstance(record, dict):
        return None, Reason.MALFORMED, f"expected a JSON object, got {type(record).__name__}"
    try:
        return parse_anomaly(record), Reason.INVALID, ""
    except AnomalyRecordError as exc:
        return None, Reason.INVALID, f"not an anomaly: {exc}"


class AlertDelivery(ConsumerService):
    """Delivers `stock-anomalies` to one receiver with its own consumer group (module doc)."""

    def __init__(
        self,
        settings: Settings,
        receiver: Receiver,
        dead_letters: DeadLetters,
        *,
        report_invalid: bool = True,
        group_id: str | None = None,
    ) -> None:
        conf = settings.alerts
        super().__init__(
            settings,
            settings.kafka.anomalies_topic,
            group_id or f"{settings.worker.app_id}-alerts-{receiver.name}",
            # One HTTP attempt happens between two polls; the group must not evict us then.
            max_poll_interval_ms=int(max(300.0, 2 * conf.timeout_seconds + 60) * 1000),
        )
        self.name = f"alerts {receiver.name}"
        self.receiver = receiver
        self.dead_letters = dead_letters
        self.report_invalid = report_invalid
        self.sender = AlertSender(receiver, conf, sleep=self._pause)
        self._owned: set[TopicPartition] = set()
        self._rebalanced = False
        self._pending = 0
        self._delivered: OrderedDict[Identity, None] = OrderedDict()
        self._duplicate = ALERT_DELIVERIES.labels(receiver.name, "duplicate")

    def describe(self) -> dict[str, Any]:
        return {"receiver": self.receiver.name, "endpoint": self.receiver.describe()}

    async def _pause(self, seconds: float) -> None:
        await self.wait_paused(seconds)

    def _set_pending(self, count: int) -> None:
        ALERT_PENDING.inc(count - self._pending)
        self._pending = count

    # -- the loop -------------------------------------------------------------------------

    async def consume(self) -> None:
        while True:
            polled = await self.consumer.getmany(timeout_ms=1000, max_records=_BATCH_RECORDS)
            records = [r for tp, rs in polled.items() if tp in self._owned for r in rs]
            self._rebalanced = False
            for done, record in enumerate(records):
                self._set_pending(len(records) - done)
                await self._handle(record)
                if self._rebalanced:
                    self._rewind(records[done + 1 :])
                    break
            self._set_pending(0)

    def _rewind(self, unhandled: list[Any]) -> None:
        """After a rebalance mid-batch: partitions still ours are read again from their first
        unhandled record (the rest of this batch is dropped); the others' new owners have
        theirs."""
        first: dict[TopicPartition, int] = {}
        for record in unhandled:
            tp = TopicPartition(record.topic, record.partition)
            first.setdefault(tp, record.offset)
        for tp, offset in first.items():
            if tp in self._owned:
                self.consumer.seek(tp, offset)

    async def _handle(self, record: Any) -> None:
        tp = TopicPartition(record.topic, record.partition)
        anomaly, reason, error = decode_anomaly(record.value)
        if anomaly is None:
            if self.report_invalid:
                await self._dead_letter(record, reason, error)
        elif (identity := anomaly_identity(anomaly)) in self._delivered:
            self._duplicate.inc()
            log.info(
                f"{self.receiver.name} alert already delivered, not sent again",
                extra=self._where(record, anomaly),
            )
        else:
            try:
                await self.sender.deliver(anomaly, wanted=lambda: tp in self._owned)
            except Abandoned:
                log.info(
                    f"{self.receiver.name} alert left to the partition's new owner",
                    extra=self._where(record, anomaly),
                )
                return
            except AlertFailed as exc:
                await self._dead_letter(record, Reason.ALERT_FAILED, str(exc))
            else:
                self._remember(identity)
        if tp in self._owned:
            await self.commit({tp: record.offset + 1})

    async def _dead_letter(self, record: SourceRecord, reason: Reason, error: str) -> None:
        batch = self.dead_letters.batch()
        await batch.add(record, reason, error)
        # Acknowledged before the offset is committed: the DLQ is then the record's only home.
        await batch.deliver()

    def _remember(self, identity: Identity) -> None:
        self._delivered[identity] = None
        if len(self._delivered) > _REMEMBERED:
            self._delivered.popitem(last=False)

    def _where(self, record: Any, anomaly: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "receiver": self.receiver.name,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "symbol": str(anomaly["symbol"])[:64],
            "kind": anomaly["kind"],
            "window_start_ms": anomaly["window_start_ms"],
        }

    # -- lifecycle and rebalances ---------------------------------------------------------

    async def on_stop(self) -> None:
        self._owned.clear()
        self._set_pending(0)
        await self.sender.close()

    def resumable(self) -> set[TopicPartition]:
        return self._owned

    async def on_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self._owned = set(assigned)

    async def on_revoked(self, revoked: Collection[TopicPartition]) -> None:
        self._owned -= set(revoked)
        self._rebalanced = True


def alert_services(settings: Settings, dead_letters: DeadLetters) -> list[AlertDelivery]:
    """One service per receiver that is on; none when both are off. Raises `SettingsError`
    for alert settings that cannot work."""
    receivers = receivers_from_settings(settings.alerts, settings.worker.app_id)
    return [
        # The first one alone dead-letters records that are not anomalies: one dead letter each.
        AlertDelivery(settings, receiver, dead_letters, report_invalid=position == 0)
        for position, receiver in enumerate(receivers)
    ]
