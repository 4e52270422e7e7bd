"""The two receivers of alerts and one HTTP attempt at each, its answer sorted for the retry
policy: delivered (2xx), `Throttled` (429, with its Retry-After), `ReceiverUnavailable`
(timeouts, connection errors, 5xx: retried) or `DeliveryRefused` (any other answer: retrying
would be refused again, the anomaly is dead-lettered).

- `SlackWebhook`: a Slack-compatible incoming webhook (`ALERT_SLACK_WEBHOOK_URL`). The URL is
  the credential (anyone holding it can post), so it is a Secret: never logged, never in an
  error; logs name the receiver as `https://hooks.slack.com/***`.
- `PagerDutyEvents`: Events API v2 (`ALERT_PAGERDUTY_URL`, `ALERT_PAGERDUTY_ROUTING_KEY`); the
  routing key travels only in the body.

Every error message goes through `redact` (aiohttp errors quote the URL; a receiver may echo
the request in its error body), and errors are raised `from None`, so no traceback carries the
original exception either.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from stockstream.alerts.payloads import pagerduty_event, slack_message
from stockstream.envconfig import redact_url
from stockstream.errors import StockstreamError
from stockstream.settings import AlertSettings, Secret, SettingsError

#: A Retry-After beyond this is treated as this: a broken header must not stop alerts for days.
MAX_RETRY_AFTER_SECONDS = 300.0
#: How much of an error answer's body is kept for the message.
_ERROR_BODY_BYTES = 300


class DeliveryError(StockstreamError):
    """One attempt failed; the message names the receiver, never a secret."""


class ReceiverUnavailable(DeliveryError):
    """No answer, or a 5xx: the receiver may be back later (retried)."""


class Throttled(DeliveryError):
    """HTTP 429 (retried, not before `retry_after` seconds when the receiver said so)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeliveryRefused(DeliveryError):
    """An answer that a retry would get again (a 4xx other than 429, a redirect)."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), at most
    `MAX_RETRY_AFTER_SECONDS`; None when absent or unreadable."""
    if value is None or not value.strip() or len(value) > 64:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value.strip()).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _check_url(url: str, variable: str) -> None:
    """Refuse a URL that cannot work, naming the variable and never the value."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise SettingsError(f"{variable}: expected an http(s) URL with a host")


class Receiver(ABC):
    """One alert destination: its body for an anomaly and one POST of it."""

    #: Label in logs and metrics.
    name = "receiver"

    def __init__(self, url: str, secrets: tuple[str, ...]) -> None:
        self._url = url
        forms = {form for secret in secrets if secret for form in (secret, quote(secret, safe=""))}
        # Longest first: a URL is masked whole before its path would be.
        self._secrets = sorted(forms, key=len, reverse=True)

    @abstractmethod
    def body(self, anomaly: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body announcing `anomaly` (a record `parse_anomaly` accepted)."""

    @abstractmethod
    def describe(self) -> str:
        """Where it posts, secrets masked (for logs)."""

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    async def post(
        self, session: aiohttp.ClientSession, anomaly: Mapping[str, Any], timeout_s: float
    ) -> None:
        """One attempt; returns when the receiver accepted it (2xx), else raises a
        `DeliveryError`."""
        data = orjson.dumps(self.body(anomaly))
        try:
            async with session.post(
                self._url,
                data=data,
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                # A redirect would re-send the body (with the routing key) somewhere else.
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                text = (await response.content.read(_ERROR_BODY_BYTES)).decode("utf-8", "replace")
        except TimeoutError:
            raise ReceiverUnavailable(f"{self.name}: no answer within {timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ReceiverUnavailable(self._error(f"{type(exc).__name__}: {exc}")) from None
        answer = self._error(f"HTTP {status}: {' '.join(text.split())[:_ERROR_BODY_BYTES]}")
        if status == 429:
            raise Throttled(answer, retry_after)
        if status >= 500:
            raise ReceiverUnavailable(answer)
        raise DeliveryRefused(answer)

    def _error(self, text: str) -> str:
        return f"{self.name}: {self.redact(text)}"


class SlackWebhook(Receiver):
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat... take `text`)."""

    name = "slack"

    def __init__(self, url: Secret) -> None:
        value = url.reveal()
        parts = urlsplit(value)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        # The path is the token (hooks.slack.com/services/T…/B…/secret); a trivial one is not.
        super().__init__(value, (value, path if len(path) >= 8 else ""))
        self._public = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/***"

    def body(self, anomaly: Mapping[str, Any]) -> dict[str, Any]:
        return slack_message(anomaly)

    def describe(self) -> str:
        return self._public


class PagerDutyEvents(Receiver):
    """PagerDuty Events API v2: one `trigger` per anomaly, deduplicated on its identity."""

    name = "pagerduty"

    def __init__(self, url: str, routing_key: Secret, source: str) -> None:
        super().__init__(url, (routing_key.reveal(),))
        self._routing_key = routing_key
        self._source = source
        self._public = redact_url(url)

    def body(self, anomaly: Mapping[str, Any]) -> dict[str, Any]:
        return pagerduty_event(anomaly, self._routing_key.reveal(), self._source)

    def describe(self) -> str:
        return self._public


def receivers_from_settings(conf: AlertSettings, source: str) -> list[Receiver]:
    """The receivers that are on (a receiver whose credential is empty is off); `source` names
    this deployment in PagerDuty events. Raises `SettingsError` for settings that cannot
    work."""
    receivers: list[Receiver] = []
    if conf.slack_webhook_url:
        _check_url(conf.slack_webhook_url.reveal(), "ALERT_SLACK_WEBHOOK_URL")
        receivers.append(SlackWebhook(conf.slack_webhook_url))
    if conf.pagerduty_routing_key:
        if not conf.pagerduty_url:
            raise SettingsError(
                "ALERT_PAGERDUTY_URL: empty while ALERT_PAGERDUTY_ROUTING_KEY is set"
            )
        _check_url(conf.pagerduty_url, "ALERT_PAGERDUTY_URL")
        receivers.append(PagerDutyEvents(conf.pagerduty_url, conf.pagerduty_routing_key, source))
    return receivers
