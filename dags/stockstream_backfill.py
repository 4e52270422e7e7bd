"""
### stockstream_backfill (manual)

Recomputes the one-minute windows of a time range from the raw archive and upserts into the
warehouse only the missing or different ones (`stockstream backfill`, README "Backfill and
recovery"). Safe to run again: a second run writes nothing.

Trigger it with parameters (UI: *Trigger DAG w/ config*; CLI:
`airflow dags trigger stockstream_backfill -c '{"from": "2026-01-05T14:00Z", "to":
"2026-01-05T15:00Z", "symbols": "AAPL,MSFT"}'`):

- `from`: ISO-8601 start, inclusive (UTC when no zone is given)
- `to`: ISO-8601 end, exclusive; only windows wholly inside `[from, to)` are written
- `symbols`: comma-separated symbols, empty for every symbol

The summary (`written`, `new`, `changed`, `unchanged`, `only_in_warehouse`, `late`) is the
task's XCom. Bad parameters fail at once (no retries); an unreadable archive or an unavailable
warehouse is retried, then alerted. With DuckDB, run it while the worker is stopped or runs
with `DUCKDB_HOLD_CONNECTION=false`. Who may trigger it: the `op` role (deploy/airflow/).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param, dag, get_current_context, task
from stockstream_airflow.commands import stockstream_json
from stockstream_airflow.defaults import DEFAULT_ARGS, START_DATE, failing_fast

_INSTANT = r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"


@dag(
    dag_id="stockstream_backfill",
    description="Recompute a range of windows from the archive into the warehouse",
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["stockstream", "backfill", "manual"],
    doc_md=__doc__,
    params={
        "from": Param(
            type="string",
            pattern=_INSTANT,
            title="From (inclusive)",
            description="ISO-8601, e.g. 2026-01-05T14:00Z (UTC when no zone is given)",
        ),
        "to": Param(
            type="string",
            pattern=_INSTANT,
            title="To (exclusive)",
            description="ISO-8601, after From",
        ),
        "symbols": Param(
            "",
            type="string",
            pattern=r"^[^\s]*$",
            title="Symbols",
            description="comma-separated, e.g. AAPL,MSFT; empty for every symbol",
        ),
    },
)
def stockstream_backfill() -> None:
    @task
    def backfill() -> dict[str, Any]:
        params = get_current_context()["params"]
        argv = ["backfill", "--from", params["from"], "--to", params["to"]]
        if params.get("symbols"):
            argv += ["--symbols", params["symbols"]]
        with failing_fast():
            return stockstream_json(*argv)

    backfill()


stockstream_backfill()
