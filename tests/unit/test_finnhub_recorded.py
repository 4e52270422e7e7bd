"""Payloads other people recorded from the real Finnhub API (tests/data/finnhub/recorded.json,
each with where it came from) through the real code: the quote mapping, the trade mapping and
the quote contract the worker applies, the symbol formats, the error bodies the sources tell
apart, and that the fake server answers with the same bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from stockstream.contracts.quotes import QuoteValidator
from stockstream.settings import AggregationSettings, QuoteSettings, Secret
from stockstream.sources.finnhub.api import (
    denial_kind,
    error_text,
    is_unknown_symbol,
    to_quote,
    validate_answer,
)
from stockstream.sources.finnhub.websocket import FinnhubTradeSource
from stockstream.tables.windows import PartitionWindows
from tests.fakes import finnhub as fake

CORPUS = json.loads((Path(__file__).parents[1] / "data/finnhub/recorded.json").read_text())
VALIDATOR = QuoteValidator(QuoteSettings().symbol_pattern, max_future_ms=2**62)


def entries(section: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, e) for name, e in CORPUS[section].items() if isinstance(e, dict)]


def test_every_entry_says_where_it_came_from() -> None:
    for section in ("quote", "errors", "websocket"):
        for name, entry in entries(section):
            assert entry.get("source"), f"{section}.{name} has no source"
    assert all(s.get("source") for s in CORPUS["symbols"])


@pytest.mark.parametrize(("name", "entry"), entries("quote"), ids=lambda v: str(v)[:40])
def test_every_recorded_quote_answer_is_a_quote_or_an_unknown_symbol(
    name: str, entry: dict[str, Any]
) -> None:
    answer = validate_answer(entry["payload"])  # old answers lack d/dp: still valid
    if is_unknown_symbol(answer):
        return
    quote = to_quote("AAPL", answer, fetched_at=answer["t"] * 1000)
    record = orjson.loads(quote.to_json())
    VALIDATOR.validate(b"AAPL", record, now_ms=record["market_timestamp"])


@pytest.mark.parametrize("symbol", [s["symbol"] for s in CORPUS["symbols"]])
def test_every_recorded_symbol_passes_the_contract(symbol: str) -> None:
    assert VALIDATOR.check_symbol(symbol) == symbol


def trade_messages() -> list[tuple[str, Any]]:
    return [
        (name, e["payload"])
        for name, e in entries("websocket")
        if isinstance(e.get("payload"), dict) and e["payload"].get("type") == "trade"
    ]


@pytest.mark.parametrize(("name", "message"), trade_messages(), ids=lambda v: str(v)[:40])
def test_every_recorded_trade_becomes_quotes_the_worker_accepts_and_windows_fold(
    name: str, message: dict[str, Any]
) -> None:
    settings = fake.FakeFinnhub().settings(api_key=Secret("k"), symbols=("AAPL",))
    source = FinnhubTradeSource(settings)
    quotes = source.handle_message(orjson.dumps(message))
    assert len(quotes) == len(message["data"])  # none skipped as malformed
    windows = PartitionWindows(
        60_000, 5_000, excluded_conditions=AggregationSettings().excluded_condition_codes
    )
    for offset, (quote, raw) in enumerate(zip(quotes, message["data"], strict=True)):
        assert quote.conditions == (tuple(raw["c"]) if raw["c"] else None)
        record = orjson.loads(quote.to_json())
        checked = VALIDATOR.validate(quote.symbol.encode(), record, now_ms=record["fetched_at"])
        assert checked == quote
        windows.apply(quote, offset)
    total = sum(t["v"] for t in message["data"])
    assert sum(w.volume or 0 for w in windows.open.values()) == pytest.approx(total)


def test_the_recorded_error_bodies_are_told_apart() -> None:
    errors = CORPUS["errors"]

    def kind(name: str) -> str | None:
        body = errors[name]["body"]
        raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
        return denial_kind(error_text(raw))

    assert kind("invalid_key_2026") == "key"
    assert kind("invalid_key_plain_2020") == "key"
    for name in ("no_access_sbin_ns", "no_access_status_401_2021", "no_access_sberp_me"):
        assert kind(name) == "no_access", name
    assert kind("no_access_mowi_ol") == "no_access"
    assert kind("cfd_indices") == "no_access"


def test_the_fake_answers_with_the_recorded_bodies() -> None:
    errors = CORPUS["errors"]
    assert errors["invalid_key_2026"]["body"] == fake.INVALID_KEY
    assert errors["no_access_sbin_ns"]["body"] == fake.NO_ACCESS
    assert errors["rate_limit_json"]["body"] == {"error": fake.LIMIT_REACHED}
    cap = CORPUS["websocket"]["error_too_many_symbols"]["payload"]
    assert cap == {"msg": "Subscribing to too many symbols", "type": "error"}


def test_the_default_excluded_conditions_are_codes_of_the_recorded_table() -> None:
    codes = CORPUS["conditions"]["codes"]
    names = {code: codes[code] for code in AggregationSettings().excluded_conditions}
    assert names["12"] == "Odd Lot Trade" and names["3"] == "Average Price Trade"
    assert "Form-T" in names["24"]
