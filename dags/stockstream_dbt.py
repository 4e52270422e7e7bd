"""
### stockstream_dbt (hourly)

Builds the analytics layer (`scripts/dbt.sh build`: models and their tests, README "Analytics
(dbt)") only when its sources are fresh: `scripts/dbt.sh source freshness` runs first and
fails when the archive or the aggregates table is older than its `error_after`
(`DBT_FRESHNESS_ERROR_MINUTES`, 60 by default). A stale source fails that task at once (a retry
minutes later rarely helps; the next hourly run checks again), the failure is alerted and the
build does not run (upstream failed), so the models never silently present stale data as
current. Other dbt failures (a query error, the warehouse file held) are retried first.

With DuckDB, dbt ATTACHes the warehouse file read-only: the worker must run with
`DUCKDB_HOLD_CONNECTION=false` (or be stopped) for this DAG to get at it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowFailException
from stockstream_airflow.commands import CommandFailed, dbt
from stockstream_airflow.defaults import DEFAULT_ARGS, START_DATE
from stockstream_airflow.plan import stale_sources


@dag(
    dag_id="stockstream_dbt",
    description="dbt build of the analytics layer, gated on source freshness",
    schedule="@hourly",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["stockstream", "dbt"],
    doc_md=__doc__,
)
def stockstream_dbt() -> None:
    @task
    def source_freshness() -> None:
        with tempfile.TemporaryDirectory(prefix="stockstream-freshness-") as tmp:
            report = Path(tmp) / "sources.json"
            try:
                dbt("source", "freshness", "--output", str(report))
            except CommandFailed as exc:
                stale = stale_sources(report)
                if stale:
                    raise AirflowFailException(f"stale sources: {', '.join(stale)}") from exc
                raise

    @task
    def build() -> None:
        dbt("build")

    source_freshness() >> build()


stockstream_dbt()
