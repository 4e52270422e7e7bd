"""Delivering alerts over real HTTP to a local aiohttp receiver (no mocks): the bodies Slack
and PagerDuty receive, retries with backoff on 5xx, timeouts and refused connections, 429 with
Retry-After, a 4xx given up on at once, the rate limit counted at the receiver, and secrets that
never reach a log line, an error or a metric."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from stockstream.alerts.delivery import alert_services
from stockstream.alerts.payloads import pagerduty_event, slack_message
from stockstream.alerts.receivers import (
    MAX_RETRY_AFTER_SECONDS,
    PagerDutyEvents,
    Receiver,
    SlackWebhook,
    parse_retry_after,
    receivers_from_settings,
)
from stockstream.alerts.sender import Abandoned, AlertFailed, AlertSender
from stockstream.contracts.anomalies import AnomalyKind, anomaly_record, parse_anomaly
from stockstream.deadletter import DeadLetters
from stockstream.logs import JsonFormatter, TextFormatter
from stockstream.metrics import REGISTRY
from stockstream.settings import AlertSettings, Secret, Settings, SettingsError
from tests.conftest import free_port
from tests.fakes.finnhub import max_in_window

T0 = 1_767_623_400_000
SLACK_PATH = "/services/T0SECRET/B0SECRET/XyZsEcReTtOkEn123"
ROUTING_KEY = "PDKEY-R0UT1NG-SECRET-42"


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Got:
    at: float
    path: str
    content_type: str
    body: dict[str, Any]


class LocalReceiver:
    """An HTTP server answering from a script (then `default`), recording every request."""

    def __init__(self) -> None:
        self.port = free_port()
        self.script: list[Answer] = []
        self.default = Answer()
        self.requests: list[Got] = []
        self.echo = False  # answer with the request (URL and body), as some servers do
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            Got(time.monotonic(), request.path, request.content_type, orjson.loads(raw))
        )
        answer = self.script.pop(0) if self.script else self.default
        if answer.delay:
            await asyncio.sleep(answer.delay)
        body = answer.body
        if self.echo:
            body += b" " + str(request.url).encode() + b" " + raw
        return web.Response(status=answer.status, body=body, headers=answer.headers)

    async def __aenter__(self) -> LocalReceiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)  # ours: it would log the URL
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[LocalReceiver]:
    async with LocalReceiver() as server:
        yield server


def anomaly(symbol: str = "AAPL", minute: int = 0) -> dict[str, Any]:
    start = T0 + minute * 60_000
    return parse_anomaly(
        anomaly_record(
            symbol=symbol,
            start_ms=start,
            end_ms=start + 60_000,
            kind=AnomalyKind.RETURN,
            value=0.0123,
            mean=0.0001,
            stddev=0.0025,
            threshold=3.0,
            history=60,
            close=191.25,
            volume=12_345.0,
            detected_at_ms=start + 65_000,
        )
    )


def conf(**overrides: Any) -> AlertSettings:
    fast = {
        "max_retries": 3,
        "timeout_seconds": 2.0,
        "backoff_initial_seconds": 0.05,
        "backoff_max_seconds": 0.2,
        "max_per_minute": 1000,
    }
    return replace(AlertSettings(), **{**fast, **overrides})


def slack(server: LocalReceiver) -> SlackWebhook:
    return SlackWebhook(Secret(server.base + SLACK_PATH))


def pagerduty(server: LocalReceiver) -> PagerDutyEvents:
    return PagerDutyEvents(server.base + "/v2/enqueue", Secret(ROUTING_KEY), "stockstream-test")


def metric(receiver: str, outcome: str) -> float:
    labels = {"receiver": receiver, "outcome": outcome}
    return REGISTRY.get_sample_value("stockstream_alert_deliveries_total", labels) or 0.0


async def deliver(target: Receiver, settings: AlertSettings, *records: dict[str, Any]) -> int:
    sender = AlertSender(target, settings)
    try:
        attempts = 0
        for record in records:
            attempts += await sender.deliver(record)
        return attempts
    finally:
        await sender.close()


# -- bodies -----------------------------------------------------------------------------------


async def test_slack_webhook_receives_text_and_blocks(receiver: LocalReceiver) -> None:
    record = anomaly()
    assert await deliver(slack(receiver), conf(), record) == 1
    [got] = receiver.requests
    assert got.path == SLACK_PATH
    assert got.content_type == "application/json"
    assert got.body == slack_message(record)
    assert got.body["text"].startswith("Anomaly: AAPL: unusual return +1.23 %")
    assert [b["type"] for b in got.body["blocks"]] == ["header", "section", "context"]


async def test_pagerduty_receives_an_events_v2_trigger(receiver: LocalReceiver) -> None:
    receiver.default = Answer(202, b'{"status":"success","message":"Event processed"}')
    record = anomaly()
    assert await deliver(pagerduty(receiver), conf(), record) == 1
    [got] = receiver.requests
    assert got.path == "/v2/enqueue"
    assert got.body == pagerduty_event(record, ROUTING_KEY, "stockstream-test")
    body = got.body
    assert body["routing_key"] == ROUTING_KEY
    assert body["event_action"] == "trigger"
    assert body["dedup_key"] == f"stockstream/anomaly/AAPL/{T0}/return"
    payload = body["payload"]
    assert payload["summary"].startswith("AAPL: unusual return")
    assert payload["source"] == "stockstream-test"
    assert payload["severity"] in {"critical", "error", "warning", "info"}
    assert datetime.fromisoformat(payload["timestamp"]) == datetime(
        2026, 1, 5, 14, 31, 5, tzinfo=UTC
    )
    assert payload["custom_details"]["symbol"] == "AAPL"


async def test_a_redelivered_anomaly_carries_the_same_dedup_key(receiver: LocalReceiver) -> None:
    await deliver(pagerduty(receiver), conf(), anomaly(), anomaly(), anomaly(minute=1))
    keys = [got.body["dedup_key"] for got in receiver.requests]
    assert keys[0] == keys[1] != keys[2]


# -- retries ----------------------------------------------------------------------------------


async def test_5xx_is_retried_with_backoff_until_delivered(receiver: LocalReceiver) -> None:
    receiver.script = [Answer(503, b"busy"), Answer(500, b"oops")]
    retried, delivered = metric("slack", "retried"), metric("slack", "delivered")
    backoff = conf(backoff_initial_seconds=0.2, backoff_max_seconds=1.0)
    assert await deliver(slack(receiver), backoff, anomaly()) == 3
    assert len(receiver.requests) == 3
    stamps = [got.at for got in receiver.requests]
    # Equal jitter: at least half the ceiling, which doubles (0.2 s, then 0.4 s).
    assert stamps[1] - stamps[0] >= 0.1 - 0.01
    assert stamps[2] - stamps[1] >= 0.2 - 0.01
    assert metric("slack", "retried") == retried + 2
    assert metric("slack", "delivered") == delivered + 1


async def test_a_timeout_is_retried(receiver: LocalReceiver) -> None:
    receiver.script = [Answer(delay=1.5)]
    assert await deliver(slack(receiver), conf(timeout_seconds=0.3), anomaly()) == 2
    assert len(receiver.requests) == 2


async def test_an_unreachable_receiver_is_retried_then_given_up() -> None:
    target = SlackWebhook(Secret(f"http://127.0.0.1:{free_port()}{SLACK_PATH}"))
    with pytest.raises(AlertFailed) as failed:
        await deliver(target, conf(max_retries=2), anomaly())
    assert failed.value.attempts == 3
    assert "gave up after 3 attempts" in str(failed.value)
    assert "ClientConnectorError" in str(failed.value)


async def test_429_waits_for_retry_after(receiver: LocalReceiver) -> None:
    receiver.script = [Answer(429, b"rate_limited", {"Retry-After": "1"})]
    throttled = metric("pagerduty", "throttled")
    assert await deliver(pagerduty(receiver), conf(backoff_max_seconds=0.05), anomaly()) == 2
    first, second = receiver.requests
    assert second.at - first.at >= 1.0 - 0.02  # not the 0.05 s backoff: the header's 1 s
    assert metric("pagerduty", "throttled") == throttled + 1


async def test_retry_after_also_holds_back_the_next_anomaly(receiver: LocalReceiver) -> None:
    receiver.script = [Answer(429, b"", {"Retry-After": "1"})]
    # Retries exhausted on the 429 (no retry allowed): the next anomaly still waits for it.
    sender = AlertSender(pagerduty(receiver), conf(max_retries=0))
    try:
        with pytest.raises(AlertFailed, match="HTTP 429"):
            await sender.deliver(anomaly())
        await sender.deliver(anomaly(minute=1))
    finally:
        await sender.close()
    first, second = receiver.requests
    assert second.at - first.at >= 1.0 - 0.02


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("1e9") == MAX_RETRY_AFTER_SECONDS
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (parse_retry_after(later) or 0) <= 30


async def test_a_4xx_is_given_up_at_once(receiver: LocalReceiver) -> None:
    receiver.default = Answer(400, b"invalid_payload")
    failed_before = metric("slack", "failed")
    with pytest.raises(AlertFailed) as failed:
        await deliver(slack(receiver), conf(max_retries=5), anomaly())
    assert len(receiver.requests) == 1
    assert failed.value.attempts == 1
    assert str(failed.value) == "slack: HTTP 400: invalid_payload (refused, not retried)"
    assert metric("slack", "failed") == failed_before + 1


async def test_a_redirect_is_not_followed(receiver: LocalReceiver) -> None:
    receiver.default = Answer(302, b"", {"Location": receiver.base + "/elsewhere"})
    with pytest.raises(AlertFailed, match="HTTP 302"):
        await deliver(pagerduty(receiver), conf(), anomaly())
    assert [got.path for got in receiver.requests] == ["/v2/enqueue"]


async def test_retries_are_bounded(receiver: LocalReceiver) -> None:
    receiver.default = Answer(502, b"bad gateway")
    with pytest.raises(AlertFailed, match=r"HTTP 502: bad gateway \(gave up after 3 attempts\)"):
        await deliver(slack(receiver), conf(max_retries=2), anomaly())
    assert len(receiver.requests) == 3


async def test_a_delivery_no_longer_wanted_stops_between_attempts(
    receiver: LocalReceiver,
) -> None:
    receiver.default = Answer(503)
    sender = AlertSender(slack(receiver), conf(max_retries=10))
    try:
        with pytest.raises(Abandoned):
            await sender.deliver(anomaly(), wanted=lambda: not receiver.requests)
    finally:
        await sender.close()
    assert len(receiver.requests) == 1


# -- rate limit -------------------------------------------------------------------------------


async def test_rate_limit_holds_at_the_receiver(receiver: LocalReceiver) -> None:
    # 3 per (1-second) minute: the window is shortened so the test does not take minutes.
    sender = AlertSender(slack(receiver), conf(max_per_minute=3), window_seconds=1.0)
    try:
        for minute in range(8):
            await sender.deliver(anomaly(minute=minute))
    finally:
        await sender.close()
    stamps = [got.at for got in receiver.requests]
    assert len(stamps) == 8  # nothing dropped: a burst waits
    assert max_in_window(stamps, 1.0) == 3


async def test_retries_count_against_the_rate_limit(receiver: LocalReceiver) -> None:
    receiver.script = [Answer(503)] * 4
    settings = conf(max_per_minute=2, max_retries=5, backoff_max_seconds=0.05)
    sender = AlertSender(slack(receiver), settings, window_seconds=1.0)
    try:
        await sender.deliver(anomaly())
    finally:
        await sender.close()
    assert len(receiver.requests) == 5
    assert max_in_window([got.at for got in receiver.requests], 1.0) == 2


# -- secrets ----------------------------------------------------------------------------------


def formatted_logs(caplog: pytest.LogCaptureFixture) -> str:
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    return "\n".join(
        json_fmt.format(r) + "\n" + text_fmt.format(r) + "\n" + repr(vars(r))
        for r in caplog.records
    )


async def test_secrets_never_reach_logs_errors_or_metrics(
    receiver: LocalReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.echo = True  # error answers quote the URL and the body (with the routing key)
    receiver.script = [Answer(500, b"echo"), Answer(500, b"echo")]
    receiver.default = Answer(400, b"echo")
    errors: list[str] = []
    unreachable = SlackWebhook(Secret(f"http://127.0.0.1:{free_port()}{SLACK_PATH}"))
    for target in (slack(receiver), pagerduty(receiver), unreachable):
        with pytest.raises(AlertFailed) as failed:
            await deliver(target, conf(max_retries=2), anomaly())
        errors += [str(failed.value), repr(failed.value), repr(target), target.describe()]
        assert failed.value.__cause__ is None and failed.value.__suppress_context__
    assert any("ClientConnectorError" in e for e in errors)
    assert any("HTTP 400: echo" in e and "***" in e for e in errors)  # the echo was masked
    seen = "\n".join(errors) + formatted_logs(caplog) + generate_latest(REGISTRY).decode()
    assert "XyZsEcReTtOkEn123" not in seen and "T0SECRET" not in seen
    assert ROUTING_KEY not in seen
    assert slack(receiver).describe() == f"http://127.0.0.1:{receiver.port}/***"


# -- which receivers are on -------------------------------------------------------------------


def test_receivers_follow_the_settings() -> None:
    assert receivers_from_settings(AlertSettings(), "app") == []
    only_slack = replace(AlertSettings(), slack_webhook_url=Secret("https://hooks.example/x"))
    assert [r.name for r in receivers_from_settings(only_slack, "app")] == ["slack"]
    only_pd = replace(AlertSettings(), pagerduty_routing_key=Secret(ROUTING_KEY))
    assert [r.name for r in receivers_from_settings(only_pd, "app")] == ["pagerduty"]
    both = replace(only_pd, slack_webhook_url=Secret("https://hooks.example/x"))
    assert [r.name for r in receivers_from_settings(both, "app")] == ["slack", "pagerduty"]


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"slack_webhook_url": Secret("hooks.slack.com/services/XyZsEcReT")}, "ALERT_SLACK"),
        ({"slack_webhook_url": Secret("ftp://XyZsEcReT@host/")}, "ALERT_SLACK_WEBHOOK_URL"),
        (
            {"pagerduty_routing_key": Secret("XyZsEcReT"), "pagerduty_url": ""},
            "ALERT_PAGERDUTY_URL",
        ),
        (
            {"pagerduty_routing_key": Secret("XyZsEcReT"), "pagerduty_url": "events"},
            "ALERT_PAGERDUTY_URL",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_without_the_secret(
    overrides: dict[str, Any], variable: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        receivers_from_settings(replace(AlertSettings(), **overrides), "app")
    assert str(refused.value).startswith(variable)
    assert "XyZsEcReT" not in str(refused.value)


def test_one_service_per_receiver_and_none_when_both_are_off() -> None:
    async def never(key: bytes | None, value: bytes) -> Any:
        raise AssertionError("nothing is dead-lettered here")

    dead_letters = DeadLetters(never)
    assert alert_services(Settings(), dead_letters) == []
    alerts = replace(
        AlertSettings(),
        slack_webhook_url=Secret("https://hooks.example/services/x"),
        pagerduty_routing_key=Secret(ROUTING_KEY),
    )
    services = alert_services(replace(Settings(), alerts=alerts), dead_letters)
    assert [(s.group_id, s.topic, s.report_invalid) for s in services] == [
        ("stockstream-alerts-slack", "stock-anomalies", True),
        ("stockstream-alerts-pagerduty", "stock-anomalies", False),
    ]
