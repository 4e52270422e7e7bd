"""
### stockstream_reconcile (daily, 00:30 UTC)

Finds the one-minute windows of the day that just ended which the warehouse lacks while the
archive explains them (`stockstream gaps --day D --json`), backfills them with one mapped task
per UTC hour that has gaps (`stockstream backfill --from H --to H+1h --symbols ...`), then
checks the day again: gaps still there fail the run (and alert).

- `day` param: reconcile another day (YYYY-MM-DD) when triggered by hand.
- The hourly backfills run one at a time by default: DuckDB allows one process per file.
  On BigQuery set `STOCKSTREAM_BACKFILL_PARALLELISM` in the scheduler's environment.
- A day without gaps maps no backfill and the check finds none: a second run writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException
from stockstream_airflow.commands import stockstream_json
from stockstream_airflow.defaults import DEFAULT_ARGS, START_DATE, failing_fast
from stockstream_airflow.plan import hourly_backfills, reconciled_day, total

log = logging.getLogger(__name__)

#: Concurrent hourly backfills of one run (DuckDB: 1, the file has one writer).
PARALLELISM = int(os.environ.get("STOCKSTREAM_BACKFILL_PARALLELISM", "1"))


def _day() -> str:
    context = get_current_context()
    return reconciled_day(context["logical_date"], context["params"].get("day"))


@dag(
    dag_id="stockstream_reconcile",
    description="Find the windows the warehouse lacks for a day and backfill them",
    schedule="30 0 * * *",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["stockstream", "backfill", "reconciliation"],
    doc_md=__doc__,
    params={
        "day": Param(
            None,
            type=["null", "string"],
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            title="Day (UTC)",
            description="YYYY-MM-DD; empty: the day before the run's logical date",
        ),
    },
)
def stockstream_reconcile() -> None:
    @task
    def find_gaps() -> list[dict[str, str]]:
        day = _day()
        with failing_fast():
            report = stockstream_json("gaps", "--day", day)
        backfills = hourly_backfills(report)
        log.info("gaps of %s: %d in %d hour(s)", day, len(report["gaps"]), len(backfills))
        return backfills

    @task(max_active_tis_per_dagrun=PARALLELISM)
    def backfill_hour(hour: dict[str, str]) -> dict[str, Any]:
        with failing_fast():
            return stockstream_json(
                "backfill", "--from", hour["from"], "--to", hour["to"], "--symbols", hour["symbols"]
            )

    # Runs when no hour had gaps too (the mapped task is then skipped, not failed).
    @task(trigger_rule="none_failed")
    def check(summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        done = list(summaries or [])
        day = _day()
        with failing_fast():
            report = stockstream_json("gaps", "--day", day)
        result = {
            "day": day,
            "hours": len(done),
            "written": total(done, "written"),
            "new": total(done, "new"),
            "changed": total(done, "changed"),
            "remaining_gaps": len(report["gaps"]),
        }
        log.info("reconciled: %s", json.dumps(result))
        if report["gaps"]:
            raise AirflowFailException(f"{len(report['gaps'])} gaps remain after the backfill")
        return result

    # The mapped results arrive as an XComArg; Airflow resolves it to the list at run time.
    check(backfill_hour.expand(hour=find_gaps()))  # type: ignore[arg-type]


stockstream_reconcile()
