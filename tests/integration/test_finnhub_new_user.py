"""The issue's new-user check, end to end: a free key, `STOCK_SYMBOLS=AAPL,SBIN.NS,
OANDA:EUR_USD,BINANCE:BTCUSDT`, the real `stockstream produce --source finnhub` against a fake
Finnhub that answers as the real one does for a free key (403 "no access" for SBIN.NS), the
real broker and the real worker: quotes and windows for every symbol the key may see, one
clear line about the one it may not, nothing dead-lettered."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.fakes import FakeFinnhub
from tests.integration.harness import Stack, Worker, create_topics, read_all

pytestmark = pytest.mark.integration

T0 = 1_767_623_400  # epoch seconds, as Finnhub sends `t`
VISIBLE = ("AAPL", "OANDA:EUR_USD", "BINANCE:BTCUSDT")


async def test_a_free_key_gets_every_symbol_it_may_see_and_one_line_about_the_other(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    await create_topics(stack)
    async with FakeFinnhub(auto_advance=True) as fake:
        for symbol in VISIBLE:
            fake.set_quote(symbol, 100.0, t=T0)
        fake.deny("SBIN.NS", 403)
        env = {
            **stack.env(free_port()),
            "FINNHUB_API_KEY": fake.token,
            "FINNHUB_BASE_URL": fake.base_url,
            "STOCK_SYMBOLS": "AAPL,SBIN.NS,OANDA:EUR_USD,BINANCE:BTCUSDT",
            "FINNHUB_POLL_INTERVAL_SECONDS": "0.4",
            "PRODUCER_SPOOL_DIR": str(tmp_path / "spool"),
        }
        producer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stockstream.cli",
            "produce",
            "--source",
            "finnhub",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await fake.wait_until(lambda: len(fake.calls("AAPL")) >= 12, within=60)
        finally:
            producer.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(producer.communicate(), 60)
    assert producer.returncode == 0, output.decode()[-2000:]
    lines = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    about_sbin = [line for line in lines if line.get("symbol") == "SBIN.NS"]
    assert len(about_sbin) == 1, about_sbin
    assert "no access to this symbol" in about_sbin[0]["message"]
    assert len(fake.calls("SBIN.NS")) == 1

    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        windows = await read_all(kafka_bootstrap, stack.aggregated, until=len(VISIBLE))
        dlq = await read_all(kafka_bootstrap, stack.dlq, wait_s=2, settle=0)
    finally:
        worker.stop()
    assert sorted(w[3]["symbol"] for w in windows) == sorted(VISIBLE), worker.tail()
    assert all(w[3]["count"] >= 10 for w in windows)
    assert dlq == []
