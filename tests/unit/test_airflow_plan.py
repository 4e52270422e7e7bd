"""The DAGs' Airflow-free helpers (dags/stockstream_airflow/: plan.py, commands.py,
alerting.py) without Airflow: the day a reconciliation checks, gaps cut into hourly backfills,
stale dbt sources, real subprocesses standing in for `stockstream`, the failure alert's
command line; and the rule that the DAGs hold no SQL (it lives in dbt and the project)."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT

DAGS = ROOT / "dags"


@pytest.fixture(autouse=True, scope="module")
def dags_on_path() -> Iterator[None]:
    # Airflow puts the DAG folder on sys.path; so do we, for this module only.
    sys.path.insert(0, str(DAGS))
    try:
        yield
    finally:
        sys.path.remove(str(DAGS))
        for name in [n for n in sys.modules if n.startswith("stockstream_airflow")]:
            del sys.modules[name]


def test_the_run_checks_the_day_before_its_logical_date_unless_told() -> None:
    from stockstream_airflow.plan import reconciled_day

    assert reconciled_day(datetime(2026, 1, 6, 0, 30, tzinfo=UTC), None) == "2026-01-05"
    # 01:30 in UTC+2 is still the 5th in UTC: the day before is the 4th.
    east = timezone(timedelta(hours=2))
    assert reconciled_day(datetime(2026, 1, 6, 1, 30, tzinfo=east), None) == "2026-01-04"
    assert reconciled_day(datetime(2026, 1, 6, tzinfo=UTC), "2025-12-31") == "2025-12-31"
    for bad in ("2025-12-32", "yesterday", "2025-12-31; rm -rf /"):
        with pytest.raises(ValueError):
            reconciled_day(datetime(2026, 1, 6, tzinfo=UTC), bad)


def test_gaps_become_one_backfill_per_hour_with_that_hours_symbols() -> None:
    from stockstream_airflow.plan import hourly_backfills

    report = {
        "day": "2026-01-05",
        "gaps": [
            {"symbol": "MSFT", "window_start": "2026-01-05T15:05:00.000Z"},
            {"symbol": "AAPL", "window_start": "2026-01-05T14:35:00.000Z"},
            {"symbol": "AAPL", "window_start": "2026-01-05T15:59:00.000Z"},
            {"symbol": "BBB", "window_start": "2026-01-05T14:00:00+00:00"},
            {"symbol": "AAPL", "window_start": "2026-01-05T14:36:00.000Z"},
            {"symbol": "ZZZ", "window_start": "2026-01-05T23:59:00"},
        ],
    }
    assert hourly_backfills(report) == [
        {"from": "2026-01-05T14:00:00Z", "to": "2026-01-05T15:00:00Z", "symbols": "AAPL,BBB"},
        {"from": "2026-01-05T15:00:00Z", "to": "2026-01-05T16:00:00Z", "symbols": "AAPL,MSFT"},
        {"from": "2026-01-05T23:00:00Z", "to": "2026-01-06T00:00:00Z", "symbols": "ZZZ"},
    ]
    assert hourly_backfills({"gaps": []}) == []
    with pytest.raises(ValueError, match="gaps"):
        hourly_backfills({"ranges": []})


def test_totals_of_backfill_summaries() -> None:
    from stockstream_airflow.plan import total

    summaries = [{"written": 2, "new": 2}, {"written": 3, "new": 1, "changed": 2}]
    assert (total(summaries, "written"), total(summaries, "changed"), total([], "new")) == (5, 2, 0)


def test_stale_sources_are_the_ones_past_error_after(tmp_path: Path) -> None:
    from stockstream_airflow.plan import stale_sources

    report = tmp_path / "sources.json"
    report.write_text(
        json.dumps(
            {
                "results": [
                    {"unique_id": "source.stockstream.warehouse.aggregates_1m", "status": "pass"},
                    {"unique_id": "source.stockstream.archive.quotes", "status": "error"},
                    {"unique_id": "source.stockstream.archive.other", "status": "warn"},
                    {"unique_id": "source.stockstream.x.y", "status": "runtime error"},
                ]
            }
        )
    )
    assert stale_sources(report) == ["source.stockstream.archive.quotes"]
    assert stale_sources(tmp_path / "missing.json") == []
    report.write_text("{not json")
    assert stale_sources(report) == []


def fake_stockstream(tmp_path: Path, status: int, stdout: str) -> Path:
    """An executable standing in for `stockstream`: logs to stderr, prints, exits `status`."""
    script = tmp_path / "stockstream"
    script.write_text(
        "#!/bin/sh\n"
        'echo "{\\"level\\": \\"INFO\\", \\"message\\": \\"args: $*\\"}" >&2\n'
        f"printf '%s' '{stdout}'\n"
        f"exit {status}\n"
    )
    script.chmod(0o755)
    return script


def test_a_command_json_answer_and_its_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from stockstream_airflow.commands import CommandFailed, stockstream_json

    monkeypatch.setenv("STOCKSTREAM_BIN", str(fake_stockstream(tmp_path, 0, '{"written": 3}')))
    with caplog.at_level(logging.INFO):
        assert stockstream_json("backfill", "--from", "a", "--to", "b") == {"written": 3}
    # stderr (the command's JSON logs) reaches the task log, with the arguments it got.
    assert any("args: backfill --from a --to b --json" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("STOCKSTREAM_BIN", str(fake_stockstream(tmp_path, 2, "")))
    with pytest.raises(CommandFailed) as bad_arguments:
        stockstream_json("gaps", "--day", "x")
    assert bad_arguments.value.final and bad_arguments.value.status == 2
    assert "exited 2" in str(bad_arguments.value) and "args: gaps --day x" in str(
        bad_arguments.value
    )

    monkeypatch.setenv("STOCKSTREAM_BIN", str(fake_stockstream(tmp_path, 1, "")))
    with pytest.raises(CommandFailed) as unavailable:
        stockstream_json("gaps", "--day", "x")
    assert not unavailable.value.final

    monkeypatch.setenv("STOCKSTREAM_BIN", str(fake_stockstream(tmp_path, 0, "[1]")))
    with pytest.raises(ValueError, match="printed list"):
        stockstream_json("gaps", "--day", "x")


def context(map_index: int = -1) -> dict[str, object]:
    ti = SimpleNamespace(
        dag_id="stockstream_reconcile",
        task_id="backfill_hour",
        map_index=map_index,
        try_number=3,
        run_id="scheduled__2026-01-06T00:30:00+00:00",
        log_url="http://airflow:8080/log",
    )
    return {"ti": ti, "run_id": ti.run_id, "exception": RuntimeError("warehouse unavailable")}


def test_the_failure_alert_names_dag_run_task_and_error() -> None:
    from stockstream_airflow.alerting import alert_argv

    argv = alert_argv(context(map_index=4))
    assert argv[0].endswith("stockstream") and argv[1] == "alert"
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options["--title"] == "Airflow: stockstream_reconcile.backfill_hour[4] failed"
    assert options["--dedup-key"] == (
        "airflow/stockstream_reconcile/scheduled__2026-01-06T00:30:00+00:00/backfill_hour[4]"
    )
    assert (
        "try 3" in options["--text"] and "RuntimeError: warehouse unavailable" in options["--text"]
    )
    assert options["--link"] == "http://airflow:8080/log" and options["--source"] == "airflow"
    unmapped = alert_argv(context())
    assert unmapped[unmapped.index("--title") + 1].endswith(".backfill_hour failed")


def test_a_failing_alert_is_logged_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from stockstream_airflow.alerting import notify_failure

    monkeypatch.setenv("STOCKSTREAM_BIN", str(tmp_path / "missing"))
    with caplog.at_level(logging.INFO):
        notify_failure(context())
    monkeypatch.setenv("STOCKSTREAM_BIN", str(fake_stockstream(tmp_path, 1, "")))
    with caplog.at_level(logging.INFO):
        notify_failure(context())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "FileNotFoundError" in errors[0] and "exit 1" in errors[1]


SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|MERGE|CREATE|DROP|ALTER|TRUNCATE)\s", re.I)


def test_the_dags_hold_no_sql() -> None:
    files = sorted(DAGS.rglob("*.py"))
    assert {f.name for f in files} >= {"stockstream_dbt.py", "stockstream_reconcile.py"}
    offenders = {
        f"{f.relative_to(ROOT)}:{n}": line.strip()
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if SQL.search(line) and not line.lstrip().startswith("#")
    }
    assert offenders == {}
