"""Operational notices (a failed Airflow task, a batch job that gave up) sent to the same
receivers as the anomalies: the Slack-compatible webhook and PagerDuty from `ALERT_*`, with
their HTTP handling and secret redaction (receivers.py) and the project's retry policy.

A notice is not an anomaly, so it has its own bodies: a Slack message with a header, the text
and an optional link (the task's log), and a PagerDuty `trigger` whose `dedup_key` the caller
chooses (one per DAG run and task, so a repeated callback updates the same incident instead of
paging twice). No rate limiter: a notice is one request per receiver from a short-lived
process (`stockstream alert`), not a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp

from stockstream.alerts.payloads import PAGERDUTY_DEDUP_KEY_MAX, PAGERDUTY_SUMMARY_MAX
from stockstream.alerts.receivers import (
    DeliveryError,
    DeliveryRefused,
    PagerDutyEvents,
    Receiver,
    SlackWebhook,
    Throttled,
    receivers_from_settings,
)
from stockstream.retry import Backoff, GaveUp, Sleep, retry
from stockstream.settings import AlertSettings

#: PagerDuty's severities (Events API v2).
SEVERITIES = ("critical", "error", "warning", "info")
_TITLE_MAX = 150  # a Block Kit header's plain_text limit
_TEXT_MAX = 2900  # a section's text is limited to 3,000 characters


def _clean(value: Any, limit: int) -> str:
    text = str(value)[:limit]
    return "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in text)


def _escape(text: str) -> str:
    # Slack's mrkdwn: a failed task's message must not ping <!channel> or forge a link.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def notice(
    title: str,
    text: str,
    *,
    dedup_key: str,
    severity: str = "error",
    link: str = "",
    source: str = "stockstream",
) -> dict[str, Any]:
    """A notice record, the mapping the receivers' bodies are built from."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity: expected one of {', '.join(SEVERITIES)}, got {severity!r}")
    return {
        "title": _clean(title, _TITLE_MAX),
        "text": _clean(text, _TEXT_MAX),
        "dedup_key": _clean(dedup_key, PAGERDUTY_DEDUP_KEY_MAX),
        "severity": severity,
        "link": _clean(link, 2000),
        "source": _clean(source, 255),
        "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def slack_notice(record: Mapping[str, Any]) -> dict[str, Any]:
    """An incoming-webhook body: `text` (the notification) and Block Kit blocks."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": record["title"]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _escape(record["text"]) or "-"}},
    ]
    context = f"{record['severity']} · {_escape(record['source'])} · {record['at']}"
    if record["link"]:
        context += f" · <{_escape(record['link'])}|log>"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": _escape(f"{record['title']}: {record['text']}")[:400], "blocks": blocks}


def pagerduty_notice(record: Mapping[str, Any], routing_key: str) -> dict[str, Any]:
    """An Events API v2 `trigger` deduplicated on the caller's key."""
    details = {"text": record["text"], **({"log": record["link"]} if record["link"] else {})}
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": record["dedup_key"],
        "client": "stockstream",
        "payload": {
            "summary": f"{record['title']}: {record['text']}"[:PAGERDUTY_SUMMARY_MAX],
            "source": record["source"],
            "severity": record["severity"],
            "timestamp": record["at"],
            "component": "batch",
            "group": "pipeline",
            "class": "job-failure",
            "custom_details": details,
        },
    }


class _SlackNotices(SlackWebhook):
    def body(self, anomaly: Mapping[str, Any]) -> dict[str, Any]:
        return slack_notice(anomaly)


class _PagerDutyNotices(PagerDutyEvents):
    def __init__(self, conf: AlertSettings, source: str) -> None:
        super().__init__(conf.pagerduty_url, conf.pagerduty_routing_key, source)
        self._key = conf.pagerduty_routing_key

    def body(self, anomaly: Mapping[str, Any]) -> dict[str, Any]:
        return pagerduty_notice(anomaly, self._key.reveal())


def notice_receivers(conf: AlertSettings, source: str) -> list[Receiver]:
    """The configured receivers (checked as for anomalies), with notice bodies."""
    receivers: list[Receiver] = []
    for receiver in receivers_from_settings(conf, source):
        if isinstance(receiver, SlackWebhook):
            receivers.append(_SlackNotices(conf.slack_webhook_url))
        elif isinstance(receiver, PagerDutyEvents):
            receivers.append(_PagerDutyNotices(conf, source))
    return receivers


async def send_notice(
    conf: AlertSettings,
    record: Mapping[str, Any],
    receivers: list[Receiver],
    *,
    sleep: Sleep = asyncio.sleep,
) -> dict[str, str]:
    """Deliver `record` to every receiver; {receiver: "delivered" or the last error}. Retries
    follow `ALERT_MAX_RETRIES` and the backoff settings; a 429 also waits its Retry-After."""
    maximum = conf.backoff_max_seconds
    backoff = Backoff(min(conf.backoff_initial_seconds, maximum), maximum)
    outcome: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for receiver in receivers:
            hold = 0.0

            async def attempt(receiver: Receiver = receiver) -> None:
                nonlocal hold
                if hold:
                    await sleep(hold)
                    hold = 0.0
                try:
                    await receiver.post(session, record, conf.timeout_seconds)
                except Throttled as exc:
                    hold = exc.retry_after or 0.0
                    raise

            try:
                await retry(
                    attempt,
                    backoff,
                    what=f"{receiver.name} notice",
                    max_retries=conf.max_retries,
                    fatal=(DeliveryRefused,),
                    sleep=sleep,
                )
            except DeliveryRefused as exc:
                outcome[receiver.name] = f"{exc} (refused, not retried)"
            except GaveUp as exc:
                last = exc.last
                text = str(last) if isinstance(last, DeliveryError) else type(last).__name__
                outcome[receiver.name] = receiver.redact(f"{text} (gave up)")
            else:
                outcome[receiver.name] = "delivered"
    return outcome
