"""`stockstream produce` refuses STOCK_SYMBOLS the worker would dead-letter, naming each one,
before it connects to anything (no broker here: a refusal must come first)."""

from __future__ import annotations

import pytest

from stockstream import cli

REAL_SYMBOLS = "AAPL,SBIN.NS,OANDA:EUR_USD,BINANCE:BTCUSDT,IC MARKETS:1,FXCM:XAU/USD,^GSPC"


def produce(monkeypatch: pytest.MonkeyPatch, symbols: str, source: str = "finnhub") -> int:
    monkeypatch.setenv("STOCK_SYMBOLS", symbols)
    monkeypatch.setenv("FINNHUB_API_KEY", "k")
    monkeypatch.setenv("STOCKSTREAM_CONFIG_DIR", "/nonexistent")
    return cli.main(["produce", "--source", source])


@pytest.mark.parametrize("source", ["finnhub", "finnhub-ws"])
def test_a_symbol_the_worker_would_refuse_is_named_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        produce(monkeypatch, "AAPL,BAD\x07SYM,AAPL," + "X" * 70, source)
    message = str(stopped.value.code)
    assert message.startswith("configuration error: STOCK_SYMBOLS:")
    assert "'AAPL' is listed twice" in message
    assert "printable characters" in message and "XXXX" in message


def test_finnhub_symbol_formats_pass_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    async def no_kafka(*args: object) -> None:
        called.append("ensure_topics")
        raise SystemExit("stop here")

    monkeypatch.setattr("stockstream.kafka.topics.ensure_topics", no_kafka)
    with pytest.raises(SystemExit, match="stop here"):
        produce(monkeypatch, REAL_SYMBOLS)
    assert called == ["ensure_topics"]  # got past the symbol check
