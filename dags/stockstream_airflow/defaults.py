"""What every stockstream DAG shares on the Airflow side: owner, retries, the failure alert,
and the translation of a command's failure into Airflow's terms (a failure a retry cannot fix
fails the task at once, without its retries)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from stockstream_airflow.alerting import notify_failure
from stockstream_airflow.commands import CommandFailed

OWNER = "stockstream"
#: The DAGs' first possible run; nothing before it is ever scheduled (catchup is off).
START_DATE = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT_ARGS: dict[str, Any] = {
    "owner": OWNER,
    # Transient causes (the warehouse file held by the worker, S3 or BigQuery away) clear up;
    # three tries over ~15 minutes, then the failure alert.
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
    "execution_timeout": timedelta(hours=2),
    "on_failure_callback": notify_failure,
}


@contextmanager
def failing_fast() -> Iterator[None]:
    """A `CommandFailed` marked final becomes `AirflowFailException`: the task fails without
    using its retries (bad arguments stay bad)."""
    try:
        yield
    except CommandFailed as exc:
        if exc.final:
            raise AirflowFailException(str(exc)) from exc
        raise
