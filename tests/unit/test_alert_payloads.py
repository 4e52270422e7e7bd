"""What people see: the Slack message and the PagerDuty event of an anomaly (pure functions),
hostile strings in a record that the contract accepts, and the record decoding of the alert
service."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stockstream.alerts.delivery import MAX_RECORD_BYTES, decode_anomaly
from stockstream.alerts.payloads import (
    PAGERDUTY_SUMMARY_MAX,
    dedup_key,
    pagerduty_event,
    slack_message,
)
from stockstream.contracts.anomalies import AnomalyKind, anomaly_record, parse_anomaly
from stockstream.contracts.dead_letters import Reason
from stockstream.contracts.timestamps import MAX_EPOCH_MS

T0 = 1_767_623_400_000  # 2026-01-05T14:30:00Z


def anomaly(
    symbol: str = "AAPL",
    kind: AnomalyKind = AnomalyKind.RETURN,
    start_ms: int = T0,
    value: float = 0.0123,
    **overrides: Any,
) -> dict[str, Any]:
    record = anomaly_record(
        symbol=symbol,
        start_ms=start_ms,
        end_ms=start_ms + 60_000,
        kind=kind,
        value=value,
        mean=0.0001,
        stddev=0.0025,
        threshold=3.0,
        history=60,
        close=191.25,
        volume=12_345.0,
        detected_at_ms=start_ms + 65_000,
    )
    return parse_anomaly({**record, **overrides})


def block_texts(message: dict[str, Any]) -> str:
    return json.dumps(message["blocks"], ensure_ascii=False)


def test_slack_message_has_text_and_blocks_with_symbol_kind_value_z_window() -> None:
    message = slack_message(anomaly())
    assert message["text"] == (
        "Anomaly: AAPL: unusual return +1.23 % (z +4.88, threshold 3.00),"
        " 2026-01-05 14:30-14:31 UTC"
    )
    header, section, context = message["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Anomaly: AAPL return"},
    }
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in section["fields"]}
    assert fields == {
        "*Symbol*": "AAPL",
        "*Kind*": "return",
        "*Value*": "+1.23 %",
        "*z*": "+4.88 (threshold 3.00)",
        "*Window*": "2026-01-05 14:30-14:31 UTC",
        "*History*": "mean 0.0001, stddev 0.0025 over 60 windows",
    }
    assert all(f["type"] == "mrkdwn" for f in section["fields"])
    assert len(section["fields"]) <= 10  # Block Kit's limit
    assert context["type"] == "context"
    assert "detected 2026-01-05T14:31:05.000Z" in context["elements"][0]["text"]
    assert "volume 12,345" in context["elements"][0]["text"]


def test_slack_volume_anomaly_shows_the_volume_as_a_number() -> None:
    message = slack_message(anomaly(kind=AnomalyKind.VOLUME, value=1_250_000.0))
    assert "unusual volume 1,250,000 " in message["text"]


def test_hostile_symbol_cannot_mention_a_channel_or_break_the_layout() -> None:
    # The contract bounds the symbol's length, not its characters.
    record = anomaly(symbol="<!channel> & <https://evil|x>\n\x00")
    message = slack_message(record)
    # Slack reads mentions and links in mrkdwn only (the header is plain_text, shown as is).
    header = message["blocks"][0]["text"]
    assert header["type"] == "plain_text"
    mrkdwn = message["text"] + block_texts({"blocks": message["blocks"][1:]})
    assert "<!channel>" not in mrkdwn and "<https://" not in mrkdwn
    everything = message["text"] + block_texts(message)
    assert "&lt;!channel&gt; &amp; &lt;https://evil|x&gt;" in message["text"]
    assert "\x00" not in everything and "\n\x00" not in message["text"]
    assert len(message["blocks"][0]["text"]["text"]) <= 150


def test_unbounded_strings_of_a_valid_record_stay_bounded() -> None:
    record = anomaly(window_end="x" * 100_000, detected_at="y" * 100_000)
    event = pagerduty_event(record, "key", "stockstream")
    message = slack_message(record)
    assert len(json.dumps(event)) < 4_000 and len(json.dumps(message)) < 4_000
    # Unreadable strings: the window's end and the detection time fall back to the window.
    assert event["payload"]["custom_details"]["window_end"] == "2026-01-05T14:31:00.000Z"
    assert event["payload"]["timestamp"] == "2026-01-05T14:31:00.000Z"


def test_a_window_in_the_last_minute_of_year_9999_still_renders() -> None:
    record = anomaly(window_start_ms=MAX_EPOCH_MS - 1_000)
    assert "9999-12-31" in slack_message(record)["text"]
    details = pagerduty_event(record, "k", "s")["payload"]["custom_details"]
    assert details["window_end"].startswith("9999-12-31")


def test_pagerduty_event_follows_events_api_v2() -> None:
    event = pagerduty_event(anomaly(), "R0UT1NGKEY", "stockstream-prod")
    assert event["routing_key"] == "R0UT1NGKEY"
    assert event["event_action"] == "trigger"
    assert event["dedup_key"] == f"stockstream/anomaly/AAPL/{T0}/return"
    payload = event["payload"]
    assert payload["summary"] == (
        "AAPL: unusual return +1.23 % (z +4.88, threshold 3.00), 2026-01-05 14:30-14:31 UTC"
    )
    assert payload["source"] == "stockstream-prod"
    assert payload["severity"] == "warning"
    assert payload["timestamp"] == "2026-01-05T14:31:05.000Z"
    assert payload["component"] == "AAPL" and payload["class"] == "return"
    details = payload["custom_details"]
    assert details["z"] == pytest.approx(4.88) and details["history"] == 60
    assert details["window_start"] == "2026-01-05T14:30:00.000Z"


def test_pagerduty_severity_grows_with_z() -> None:
    assert pagerduty_event(anomaly(value=0.02), "k", "s")["payload"]["severity"] == "error"
    assert pagerduty_event(anomaly(value=-0.02), "k", "s")["payload"]["severity"] == "error"


def test_dedup_key_is_the_anomaly_identity() -> None:
    assert dedup_key(anomaly()) == dedup_key(anomaly(value=0.05))  # same anomaly, re-sent
    keys = {
        dedup_key(anomaly()),
        dedup_key(anomaly(symbol="MSFT")),
        dedup_key(anomaly(kind=AnomalyKind.VOLUME)),
        dedup_key(anomaly(start_ms=T0 + 60_000)),
    }
    assert len(keys) == 4
    assert len(dedup_key(anomaly(symbol="S" * 64))) <= 255


def test_pagerduty_summary_is_bounded() -> None:
    event = pagerduty_event(anomaly(symbol="W" * 64, value=1e300), "k", "s")
    assert len(event["payload"]["summary"]) <= PAGERDUTY_SUMMARY_MAX


# -- decoding records of the topic ------------------------------------------------------------


def test_decode_accepts_an_anomaly_record() -> None:
    value = json.dumps(anomaly_record_json()).encode()
    decoded, _, error = decode_anomaly(value)
    assert decoded is not None and decoded["symbol"] == "AAPL" and error == ""


def anomaly_record_json() -> dict[str, Any]:
    return anomaly_record(
        symbol="AAPL",
        start_ms=T0,
        end_ms=T0 + 60_000,
        kind=AnomalyKind.VOLUME,
        value=5000.0,
        mean=100.0,
        stddev=50.0,
        threshold=3.0,
        history=30,
        close=10.0,
        volume=5000.0,
        detected_at_ms=T0 + 61_000,
    )


@pytest.mark.parametrize(
    ("value", "reason", "error"),
    [
        (None, Reason.MALFORMED, "tombstone"),
        (b"{not json", Reason.MALFORMED, "not UTF-8 JSON"),
        (b"\xff\xfe", Reason.MALFORMED, "not UTF-8 JSON"),
        (b"[1, 2]", Reason.MALFORMED, "expected a JSON object"),
        (b'{"symbol": "AAPL"}', Reason.INVALID, "window_start_ms"),
        (
            json.dumps({**anomaly_record_json(), "stddev": 0}).encode(),
            Reason.INVALID,
            "stddev",
        ),
        (b" " * (MAX_RECORD_BYTES + 1), Reason.INVALID, "too large"),
    ],
)
def test_decode_refuses_what_is_not_an_anomaly(
    value: bytes | None, reason: Reason, error: str
) -> None:
    decoded, got_reason, got_error = decode_anomaly(value)
    assert decoded is None
    assert got_reason is reason
    assert error in got_error
