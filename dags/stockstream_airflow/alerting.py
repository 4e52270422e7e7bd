"""Failure alerts through the project's alerting path: a task that failed for good (retries
exhausted, or a failure a retry cannot fix) calls `stockstream alert`, which posts to the same
Slack webhook and PagerDuty service as the anomaly alerts (`ALERT_*` settings, retries and
redaction of stockstream/alerts/). The PagerDuty dedup key is the DAG run and task, so a
repeated callback updates one incident.

A callback must never raise (Airflow would only log it, and a broken alert must not hide the
task's own error): an alert that could not be sent is logged as an error instead.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping
from typing import Any

from stockstream_airflow.commands import project_dir, stockstream_bin

log = logging.getLogger(__name__)
_ALERT_TIMEOUT_SECONDS = 300


def alert_argv(context: Mapping[str, Any]) -> list[str]:
    """`stockstream alert ...` describing the failed task of `context` (Airflow's)."""
    ti = context["ti"]
    dag_id, task_id = ti.dag_id, ti.task_id
    map_index = getattr(ti, "map_index", -1)
    task = task_id if map_index is None or map_index < 0 else f"{task_id}[{map_index}]"
    run_id = context.get("run_id") or getattr(ti, "run_id", "")
    error = context.get("exception")
    text = f"Task {task} of DAG {dag_id} failed (run {run_id}, try {ti.try_number})."
    if error is not None:
        text += f"\n{type(error).__name__}: {error}"
    return [
        stockstream_bin(),
        "alert",
        "--source",
        "airflow",
        "--severity",
        "error",
        "--title",
        f"Airflow: {dag_id}.{task} failed",
        "--text",
        text,
        "--dedup-key",
        f"airflow/{dag_id}/{run_id}/{task}",
        "--link",
        str(getattr(ti, "log_url", "") or ""),
    ]


def notify_failure(context: Mapping[str, Any]) -> None:
    """`on_failure_callback` of every stockstream task."""
    try:
        argv = alert_argv(context)
        done = subprocess.run(
            argv,
            cwd=project_dir(),
            capture_output=True,
            text=True,
            timeout=_ALERT_TIMEOUT_SECONDS,
            check=False,
        )
    except Exception as exc:
        log.error("failure alert not sent: %s: %s", type(exc).__name__, exc)
        return
    if done.returncode != 0:
        log.error("failure alert not sent (exit %s): %s", done.returncode, done.stderr[-2000:])
    else:
        log.info("failure alert sent: %s %s", done.stdout.strip(), done.stderr.strip())
