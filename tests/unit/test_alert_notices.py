"""Operational notices (`stockstream alert`, used by the Airflow failure callback) over real
HTTP to a local receiver: the Slack and PagerDuty bodies, escaping, retries on 5xx, a refusal
given up on at once, secrets kept out of the outcome, and the command's exit status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stockstream.alerts.notices import notice, notice_receivers, send_notice
from stockstream.cli import main
from stockstream.settings import Secret
from tests.unit.test_alert_sender import ROUTING_KEY, SLACK_PATH, Answer, LocalReceiver, conf


@pytest.fixture
async def receiver() -> AsyncIterator[LocalReceiver]:
    async with LocalReceiver() as server:
        yield server


def record(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "title": "Airflow: stockstream_dbt.build failed",
        "text": "dbt build exited 1 <!channel> & more",
        "dedup_key": "airflow/stockstream_dbt/run-1/build",
        "link": "http://airflow:8080/dags/stockstream_dbt/runs/run-1/tasks/build?try_number=3",
        "source": "airflow",
        **overrides,
    }
    title, text = fields.pop("title"), fields.pop("text")
    return notice(title, text, **fields)


def both(server: LocalReceiver, **overrides: Any) -> Any:
    receivers = {
        "slack_webhook_url": Secret(server.base + SLACK_PATH),
        "pagerduty_routing_key": Secret(ROUTING_KEY),
        "pagerduty_url": server.base + "/v2/enqueue",
    }
    return conf(**{**receivers, **overrides})


async def test_a_notice_reaches_slack_and_pagerduty(receiver: LocalReceiver) -> None:
    settings = both(receiver)
    outcome = await send_notice(settings, record(), notice_receivers(settings, "airflow"))

    assert outcome == {"slack": "delivered", "pagerduty": "delivered"}
    slack, pagerduty = receiver.requests
    assert slack.path == SLACK_PATH
    assert slack.body["blocks"][0]["text"]["text"] == "Airflow: stockstream_dbt.build failed"
    section = slack.body["blocks"][1]["text"]["text"]
    assert "&lt;!channel&gt; &amp; more" in section and "<!channel>" not in json.dumps(slack.body)
    assert "|log>" in slack.body["blocks"][2]["elements"][0]["text"]
    assert pagerduty.path == "/v2/enqueue"
    assert pagerduty.body["routing_key"] == ROUTING_KEY
    assert pagerduty.body["dedup_key"] == "airflow/stockstream_dbt/run-1/build"
    payload = pagerduty.body["payload"]
    assert payload["severity"] == "error" and payload["source"] == "airflow"
    assert payload["custom_details"]["log"].endswith("try_number=3")


async def test_a_5xx_is_retried_and_a_4xx_is_given_up_at_once(receiver: LocalReceiver) -> None:
    settings = both(receiver, pagerduty_routing_key=Secret(""))
    receiver.script = [Answer(503), Answer(502)]
    outcome = await send_notice(settings, record(), notice_receivers(settings, "airflow"))
    assert outcome == {"slack": "delivered"}
    assert len(receiver.requests) == 3

    receiver.requests.clear()
    receiver.script = [Answer(404, b"no_service " + SLACK_PATH.encode())]
    outcome = await send_notice(settings, record(), notice_receivers(settings, "airflow"))
    assert len(receiver.requests) == 1
    assert "HTTP 404" in outcome["slack"] and "refused" in outcome["slack"]
    assert SLACK_PATH not in outcome["slack"]


async def test_retries_end_with_the_last_error(receiver: LocalReceiver) -> None:
    settings = both(receiver, pagerduty_routing_key=Secret(""), max_retries=1)
    receiver.default = Answer(500, b"down")
    outcome = await send_notice(settings, record(), notice_receivers(settings, "airflow"))
    assert len(receiver.requests) == 2
    assert outcome["slack"].endswith("(gave up)") and "HTTP 500" in outcome["slack"]


def test_an_unknown_severity_is_refused() -> None:
    with pytest.raises(ValueError, match="severity"):
        record(severity="fatal")


def _alert(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> int:
    for name in ("ALERT_SLACK_WEBHOOK_URL", "ALERT_PAGERDUTY_ROUTING_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"ALERT_MAX_RETRIES": "1", "ALERT_BACKOFF_INITIAL_SECONDS": "0.05",
                        "ALERT_BACKOFF_MAX_SECONDS": "0.1", **env}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    argv = ["alert", "--title", "t", "--text", "x", "--dedup-key", "k", "--source", "airflow"]
    return main(argv)


def test_the_command_exits_0_when_delivered_and_1_when_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def serve(answer: Answer) -> tuple[int, int]:
        async with LocalReceiver() as server:
            server.default = answer
            env = {"ALERT_SLACK_WEBHOOK_URL": server.base + SLACK_PATH}
            status = await asyncio.to_thread(_alert, monkeypatch, env)
            return status, len(server.requests)

    assert asyncio.run(serve(Answer(200))) == (0, 1)
    assert json.loads(capsys.readouterr().out) == {"slack": "delivered"}
    assert asyncio.run(serve(Answer(500))) == (1, 2)
    assert SLACK_PATH not in capsys.readouterr().out


def test_without_receivers_nothing_is_sent_and_it_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _alert(monkeypatch, {}) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {}
    assert "no receiver configured" in captured.err
