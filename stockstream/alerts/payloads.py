"""What an anomaly looks like to a person: a Slack message (text + Block Kit) and a PagerDuty
Events API v2 event. Pure functions of a record `parse_anomaly` accepted.

The contract bounds the numbers and the symbol's length but not its characters, nor the length
of the timestamp strings: a symbol such as `<!channel>` must not ping a channel, so every text
taken from the record is cut, stripped of control characters and, for Slack's mrkdwn, escaped
(`&`, `<`, `>`, as Slack documents). Times are rendered from `window_start_ms` (checked by the
contract) and from the ISO strings only when they parse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from stockstream.contracts.anomalies import AnomalyKind, anomaly_identity
from stockstream.contracts.timestamps import MAX_EPOCH_MS, iso_utc

WINDOW_MS = 60_000
#: PagerDuty limits (Events API v2): summary 1,024 characters, dedup_key 255.
PAGERDUTY_SUMMARY_MAX = 1024
PAGERDUTY_DEDUP_KEY_MAX = 255
#: Block Kit: a header's plain_text at most 150 characters.
_HEADER_MAX = 150
_STRING_MAX = 64


def dedup_key(anomaly: Mapping[str, Any]) -> str:
    """PagerDuty's `dedup_key`: the anomaly's identity, so a re-delivered anomaly updates the
    same alert instead of paging again."""
    symbol, start_ms, kind = anomaly_identity(anomaly)
    return f"stockstream/anomaly/{symbol}/{start_ms}/{kind}"[:PAGERDUTY_DEDUP_KEY_MAX]


def _plain(value: Any, limit: int = _STRING_MAX) -> str:
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _mrkdwn(value: Any, limit: int = _STRING_MAX) -> str:
    return _plain(value, limit).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _epoch_ms(text: Any) -> int | None:
    if not isinstance(text, str) or len(text) > 40:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return int(moment.timestamp() * 1000)
    except (OverflowError, ValueError, OSError):
        return None


def _window(anomaly: Mapping[str, Any]) -> tuple[int, int]:
    start = int(anomaly["window_start_ms"])
    end = _epoch_ms(anomaly.get("window_end"))
    if end is None or not start < end <= start + 86_400_000:
        end = start + WINDOW_MS
    # The contract allows a start in the last minute of year 9999: keep the end printable.
    return start, min(end, MAX_EPOCH_MS - 1)


def detected_iso(anomaly: Mapping[str, Any]) -> str:
    """When the detector emitted it (ISO-8601 UTC); the window's end when that does not parse."""
    detected = _epoch_ms(anomaly.get("detected_at"))
    return iso_utc(
        detected if detected is not None and 0 <= detected < MAX_EPOCH_MS else _window(anomaly)[1]
    )


def _number(value: float, digits: int = 2) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if abs(value) < 1e15 else f"{value:.3e}"


def format_value(anomaly: Mapping[str, Any]) -> str:
    """A return as a signed percentage, a volume as a number."""
    value = float(anomaly["value"])
    if anomaly["kind"] == AnomalyKind.RETURN.value and abs(value) < 1e6:
        return f"{value * 100:+.2f} %"
    return _number(value, 0)


def format_window(anomaly: Mapping[str, Any]) -> str:
    """`2026-01-05 14:30-14:31 UTC`."""
    start, end = _window(anomaly)
    first = datetime.fromtimestamp(start / 1000, UTC)
    last = datetime.fromtimestamp(end / 1000, UTC)
    same_day = first.date() == last.date()
    return f"{first:%Y-%m-%d %H:%M}-{last:%H:%M}" + ("" if same_day else f" ({last:%Y-%m-%d})")


def severity(anomaly: Mapping[str, Any]) -> str:
    """PagerDuty severity: `error` at twice the detection threshold or more, else `warning`
    (a market move is worth a look, not an outage)."""
    z, threshold = abs(float(anomaly["z"])), abs(float(anomaly["threshold"]))
    return "error" if threshold > 0 and z >= 2 * threshold else "warning"


def summary(anomaly: Mapping[str, Any]) -> str:
    """One plain line: `AAPL: unusual return +4.10 % (z +5.20, threshold 3.00), 2026-01-05
    14:30-14:31 UTC`."""
    return (
        f"{_plain(anomaly['symbol'])}: unusual {anomaly['kind']} {format_value(anomaly)}"
        f" (z {float(anomaly['z']):+.2f}, threshold {float(anomaly['threshold']):.2f}),"
        f" {format_window(anomaly)} UTC"
    )


def details(anomaly: Mapping[str, Any]) -> dict[str, Any]:
    """The record's fields for PagerDuty's `custom_details`, strings bounded."""
    start, end = _window(anomaly)
    return {
        "symbol": _plain(anomaly["symbol"]),
        "kind": anomaly["kind"],
        "window_start": iso_utc(start),
        "window_end": iso_utc(end),
        "window_start_ms": start,
        "value": anomaly["value"],
        "mean": anomaly["mean"],
        "stddev": anomaly["stddev"],
        "z": anomaly["z"],
        "threshold": anomaly["threshold"],
        "history": anomaly["history"],
        "close": anomaly["close"],
        "volume": anomaly["volume"],
        "detected_at": detected_iso(anomaly),
    }


def slack_message(anomaly: Mapping[str, Any]) -> dict[str, Any]:
    """An incoming-webhook body: `text` (the notification and the fallback of clients without
    Block Kit) and `blocks` with symbol, kind, value, z and window."""
    symbol = _mrkdwn(anomaly["symbol"])
    kind = anomaly["kind"]
    value = format_value(anomaly)
    z, threshold = float(anomaly["z"]), float(anomaly["threshold"])
    window = f"{format_window(anomaly)} UTC"
    volume = anomaly["volume"]

    def field(name: str, text: str) -> dict[str, str]:
        return {"type": "mrkdwn", "text": f"*{name}*\n{text}"}

    return {
        "text": f"Anomaly: {_mrkdwn(summary(anomaly), 400)}",
        "blocks": [
            {
                "type": "header",
                "text": {
                    "type": "plain_text",
                    "text": f"Anomaly: {_plain(anomaly['symbol'])} {kind}"[:_HEADER_MAX],
                },
            },
            {
                "type": "section",
                "fields": [
                    field("Symbol", symbol),
                    field("Kind", kind),
                    field("Value", value),
                    field("z", f"{z:+.2f} (threshold {threshold:.2f})"),
                    field("Window", window),
                    field(
                        "History",
                        f"mean {_number(float(anomaly['mean']), 4)},"
                        f" stddev {_number(float(anomaly['stddev']), 4)}"
                        f" over {int(anomaly['history'])} windows",
                    ),
                ],
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"close {_number(float(anomaly['close']), 4)}"
                        f" · volume {'n/a' if volume is None else _number(float(volume), 0)}"
                        f" · detected {detected_iso(anomaly)}",
                    }
                ],
            },
        ],
    }


def pagerduty_event(anomaly: Mapping[str, Any], routing_key: str, source: str) -> dict[str, Any]:
    """An Events API v2 `trigger` (https://developer.pagerduty.com/docs/events-api-v2/trigger-events/)."""
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(anomaly),
        "client": "stockstream",
        "payload": {
            "summary": summary(anomaly)[:PAGERDUTY_SUMMARY_MAX],
            "source": _plain(source, 255),
            "severity": severity(anomaly),
            "timestamp": detected_iso(anomaly),
            "component": _plain(anomaly["symbol"]),
            "group": "market-anomalies",
            "class": anomaly["kind"],
            "custom_details": details(anomaly),
        },
    }
