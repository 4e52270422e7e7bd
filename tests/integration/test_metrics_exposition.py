"""The real worker's /metrics/ against promtool's linter and the monitoring configuration:
a real broker, `faust -A stockstream worker` as a subprocess, a few minutes of quotes (some
invalid, so dead letters are counted too)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Stack, Worker, create_topics, dataset, produce
from tests.unit.test_monitoring import (
    AGREED_METRICS,
    ALERTMANAGER_METRICS,
    agreed_sample_names,
    declared_sample_names,
    metric_references,
    sample_names,
    tool,
)

pytestmark = pytest.mark.integration

# `stockstream produce` serves these from its own process; the worker never uses them.
PRODUCER_PREFIXES = ("stockstream_producer_", "stockstream_source_")


def value(text: str, sample: str) -> float:
    """Sum of a sample's values over its label sets (0 when absent)."""
    pattern = rf"^{re.escape(sample)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def scrape_when(
    worker: Worker, above_zero: list[str], present: list[str], timeout: float = 120.0
) -> str:
    """/metrics/ once every sample in `above_zero` is above 0 and every one in `present` has a
    series (the lag gauges are set by a timer and may well be 0)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        status, text = worker.get("/metrics/")
        assert status == 200
        if all(value(text, s) > 0 for s in above_zero) and all(
            re.search(rf"^{re.escape(s)}[{{ ]", text, re.MULTILINE) for s in present
        ):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{above_zero} > 0 and {present} not all in /metrics/:\n{text}")


def test_worker_metrics_pass_promtool_and_back_every_reference(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    promtool = tool("promtool", "prometheus")
    stack = Stack(kafka_bootstrap, tmp_path / "data")
    asyncio.run(create_topics(stack))
    worker = Worker(stack, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        # Enough minutes for windows to close on the watermark; bad records for the DLQ.
        rows = dataset(symbols=8, minutes=4, per_minute=60)
        asyncio.run(produce(kafka_bootstrap, stack.quotes, rows))
        text = scrape_when(
            worker,
            above_zero=[
                "stockstream_quotes_total",
                "stockstream_windows_emitted_total",
                "stockstream_dead_letters_total",
                "stockstream_window_close_lag_seconds_count",
                "stockstream_agent_batch_seconds_count",
            ],
            present=["stockstream_consumer_lag_records", "stockstream_consumer_lag_seconds"],
        )
    finally:
        worker.stop()

    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

    exposed: set[str] = set()
    for family in text_string_to_metric_families(text):
        exposed |= sample_names(family.name, family.type)  # labelled ones without samples too
    producer = {n for n in declared_sample_names() if n.startswith(PRODUCER_PREFIXES)}
    # Agreed names the worker exposes must have the agreed type.
    for family in text_string_to_metric_families(text):
        for name, kind in AGREED_METRICS.items():
            if name in sample_names(family.name, family.type):
                assert family.type == kind, f"{name} is a {family.type}, agreed: {kind}"
    known = exposed | agreed_sample_names() | producer | ALERTMANAGER_METRICS
    unknown = {
        name: sorted(where) for name, where in metric_references().items() if name not in known
    }
    assert unknown == {}, "rules or panels name metrics nobody exposes"
