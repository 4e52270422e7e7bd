"""Alert delivery end to end: a real broker, anomalies produced to the topic, the receivers as
local HTTP servers (Slack-compatible webhook, PagerDuty Events v2).

- The real worker (`faust -A stockstream worker` with ALERT_* pointing here): every anomaly
  reaches each receiver exactly once while the webhook is unreachable for a while and while
  PagerDuty answers 503, a refused anomaly ends in the DLQ as `alert-failed`, a record that is
  not an anomaly is dead-lettered once, and the secrets are nowhere in the worker's log or
  metrics.
- The service in this process: retries exhausted -> `alert-failed` in the DLQ, and the next
  anomaly is delivered (the service goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from prometheus_client.parser import text_string_to_metric_families

from stockstream.alerts.delivery import alert_services
from stockstream.contracts.anomalies import AnomalyKind, anomaly_record
from stockstream.deadletter import DeadLetters
from stockstream.settings import load_settings
from tests.conftest import free_port
from tests.integration.harness import T0, Stack, Worker, create_topics, read_all

pytestmark = pytest.mark.integration

SLACK_PATH = "/services/T0ALERTS/B0ALERTS/sEcReTwEbHoOkToKeN"
ROUTING_KEY = "R0UTING-KEY-sEcReT-0123456789"


class Endpoint:
    """One receiver: answers 2xx and records what it accepted; can be stopped (connection
    refused), made to answer 503, and refuses (400) anomalies of the symbols in `refuse`."""

    def __init__(self, name: str, ok_status: int = 200) -> None:
        self.name = name
        self.port = free_port()
        self.ok_status = ok_status
        self.accepted: list[dict[str, Any]] = []
        self.attempts = 0
        self.unavailable = False
        self.refuse: set[str] = set()
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def symbol(self, body: dict[str, Any]) -> str:
        if self.name == "pagerduty":
            return str(body["payload"]["component"])
        return str(body["blocks"][1]["fields"][0]["text"].split("\n", 1)[1])

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = orjson.loads(await request.read())
        if self.unavailable:
            return web.Response(status=503, text="maintenance")
        if self.symbol(body) in self.refuse:
            return web.Response(status=400, text="invalid_payload")
        self.accepted.append(body)
        return web.Response(status=self.ok_status, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def counts(self) -> Counter[str]:
        return Counter(self.symbol(body) for body in self.accepted)


def anomaly(symbol: str, minute: int = 0) -> bytes:
    start = T0 + minute * 60_000
    record = anomaly_record(
        symbol=symbol,
        start_ms=start,
        end_ms=start + 60_000,
        kind=AnomalyKind.VOLUME,
        value=50_000.0,
        mean=1_000.0,
        stddev=500.0,
        threshold=3.0,
        history=40,
        close=101.5,
        volume=50_000.0,
        detected_at_ms=start + 61_000,
    )
    return orjson.dumps(record)


async def send(bootstrap: str, topic: str, rows: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in rows:
            await producer.send_and_wait(topic, value=value, key=key.encode())
    finally:
        await producer.stop()


async def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def wait_for(
    check: Callable[[], bool], what: str, worker: Worker | None = None, wait_s: float = 120.0
) -> None:
    deadline = time.monotonic() + wait_s
    while not check():
        if worker is not None:
            assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
        tail = worker.tail() if worker is not None else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{tail}"
        await asyncio.sleep(0.2)


def metric(worker: Worker, receiver: str, outcome: str) -> float:
    status, text = worker.get("/metrics/")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "stockstream_alert_deliveries_total" and sample.labels == {
                "receiver": receiver,
                "outcome": outcome,
            }:
                return float(sample.value)
    return 0.0


def alert_env(stack: Stack, slack: Endpoint, pagerduty: Endpoint, **extra: str) -> None:
    stack.extra_env.update(
        {
            "KAFKA_ANOMALIES_TOPIC": f"anomalies-{stack.run}",
            "ALERT_SLACK_WEBHOOK_URL": slack.base + SLACK_PATH,
            "ALERT_PAGERDUTY_URL": pagerduty.base + "/v2/enqueue",
            "ALERT_PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
            "ALERT_TIMEOUT_SECONDS": "2",
            "ALERT_BACKOFF_INITIAL_SECONDS": "0.2",
            "ALERT_BACKOFF_MAX_SECONDS": "1",
            "ALERT_MAX_PER_MINUTE": "6000",
            # The stages this test does not need stay off (no quotes flow anyway).
            "ANOMALY_ENABLED": "false",
            "ARCHIVE_ENABLED": "false",
            "WAREHOUSE_ENABLED": "false",
            **extra,
        }
    )


async def test_every_anomaly_reaches_each_receiver_once_through_outages(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    slack, pagerduty = Endpoint("slack"), Endpoint("pagerduty", ok_status=202)
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    # Retries outlast the outages below (at least ~50 s of backoff), so nothing is given up.
    alert_env(stack, slack, pagerduty, ALERT_MAX_RETRIES="100")
    topic = stack.extra_env["KAFKA_ANOMALIES_TOPIC"]
    await create_topics(stack)
    await ensure_topic(kafka_bootstrap, topic, stack.partitions)
    await slack.start()
    await pagerduty.start()
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        expected: list[str] = []

        async def produce(names: list[str]) -> None:
            expected.extend(names)
            await send(kafka_bootstrap, topic, [(n, anomaly(n, i)) for i, n in enumerate(names)])

        def all_at(endpoint: Endpoint) -> Callable[[], bool]:
            return lambda: set(endpoint.counts()) >= set(expected)

        # Both up.
        await produce([f"UP{i:02d}" for i in range(12)])
        await wait_for(all_at(slack), "slack, both up", worker)
        await wait_for(all_at(pagerduty), "pagerduty, both up", worker)

        # The webhook unreachable (connection refused): PagerDuty does not wait for it.
        await slack.stop()
        down_since = time.monotonic()
        await produce([f"SD{i:02d}" for i in range(12)])
        await wait_for(all_at(pagerduty), "pagerduty while slack is down", worker)
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - down_since)))
        assert not set(slack.counts()) & {f"SD{i:02d}" for i in range(12)}
        await slack.start()
        await wait_for(all_at(slack), "slack after its outage", worker)

        # PagerDuty answers 503 for a while.
        pagerduty.unavailable = True
        attempts = pagerduty.attempts
        await produce([f"PD{i:02d}" for i in range(12)])
        await wait_for(all_at(slack), "slack while pagerduty answers 503", worker)
        await wait_for(lambda: pagerduty.attempts >= attempts + 3, "pagerduty retries", worker)
        pagerduty.unavailable = False
        await wait_for(all_at(pagerduty), "pagerduty after its outage", worker)

        # A refusal for good, and a record that is not an anomaly.
        slack.refuse.add("REFUSED")
        await produce(["REFUSED", "AFTER"])
        await send(kafka_bootstrap, topic, [("JUNK", b"{not an anomaly")])
        dead = await read_all(kafka_bootstrap, stack.dlq, until=2, settle=4.0)
        await wait_for(all_at(pagerduty), "pagerduty, last records", worker)
        await wait_for(lambda: "AFTER" in slack.counts(), "slack after the refusal", worker)
        await asyncio.sleep(3.0)  # anything sent twice would arrive meanwhile

        # Exactly once per receiver (the refused one: never accepted by Slack, in the DLQ).
        assert pagerduty.counts() == Counter(expected)
        assert slack.counts() == Counter(n for n in expected if n != "REFUSED")
        keys = [body["dedup_key"] for body in pagerduty.accepted]
        assert len(keys) == len(set(keys)) == len(expected)
        assert all(body["routing_key"] == ROUTING_KEY for body in pagerduty.accepted)

        letters = sorted((d[3]["reason"], d[3]["key"]) for d in dead)
        assert letters == [("alert-failed", "REFUSED"), ("malformed", "JUNK")]
        refused = next(d[3] for d in dead if d[3]["reason"] == "alert-failed")
        assert refused["topic"] == topic
        assert refused["error"] == "slack: HTTP 400: invalid_payload (refused, not retried)"
        assert orjson.loads(refused["value"])["symbol"] == "REFUSED"

        assert metric(worker, "slack", "delivered") == len(expected) - 1
        assert metric(worker, "pagerduty", "delivered") == len(expected)
        assert metric(worker, "slack", "failed") == 1
        assert metric(worker, "slack", "retried") >= 1
        assert metric(worker, "pagerduty", "retried") >= 3
        _, metrics_text = worker.get("/metrics/")
        assert re.search(r"^stockstream_alert_pending 0\.0$", metrics_text, re.M)
    finally:
        worker.stop()
        await slack.stop()
        await pagerduty.stop()
    log = worker.log_path.read_text(errors="replace")
    assert "alerts slack started" in log and "alerts pagerduty started" in log
    for secret in ("sEcReTwEbHoOkToKeN", "T0ALERTS", ROUTING_KEY):
        assert secret not in log and secret not in metrics_text


async def test_retries_exhausted_end_in_the_dlq_and_the_service_goes_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    slack, pagerduty = Endpoint("slack"), Endpoint("pagerduty")
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    alert_env(stack, slack, pagerduty, ALERT_MAX_RETRIES="2", ALERT_PAGERDUTY_ROUTING_KEY="")
    settings = load_settings(environ=stack.env(free_port()), dotenv_path=None)
    topic = settings.kafka.anomalies_topic
    await create_topics(stack)
    await ensure_topic(kafka_bootstrap, topic, stack.partitions)
    await slack.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    dead_letters = DeadLetters(lambda key, value: producer.send(stack.dlq, value, key))
    [service] = alert_services(settings, dead_letters)  # PagerDuty is off: its key is empty
    running = asyncio.create_task(service.run())
    try:
        slack.unavailable = True  # 503 to every attempt: 3 attempts, then given up
        await send(kafka_bootstrap, topic, [("DOWN", anomaly("DOWN"))])
        dead = await read_all(kafka_bootstrap, stack.dlq, until=1, settle=1.0)
        assert slack.attempts == 3
        slack.unavailable = False
        await send(kafka_bootstrap, topic, [("NEXT", anomaly("NEXT", 1))])
        await wait_for(lambda: "NEXT" in slack.counts(), "the next anomaly")
        assert running.done() is False
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await producer.stop()
        await slack.stop()
    [(_, _, key, letter, _)] = dead
    assert key == b"DOWN" and letter["reason"] == "alert-failed"
    assert letter["error"] == "slack: HTTP 503: maintenance (gave up after 3 attempts)"
    assert slack.counts() == Counter({"NEXT": 1})
