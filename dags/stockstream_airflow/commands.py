"""Running the project's commands from a task: `stockstream` (the project venv's console script)
and `scripts/dbt.sh`, with the environment the Airflow worker has (STOCKSTREAM_DATA_DIR,
WAREHOUSE_BACKEND, ALERT_*... are read by the commands themselves, as for the worker).

Where they are: `STOCKSTREAM_PROJECT_DIR` (default: the checkout these DAGs live in) and
`STOCKSTREAM_BIN` (default `<project>/.venv/bin/stockstream`), so a deployment that installs
stockstream elsewhere points there without editing a DAG.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: `stockstream backfill`/`gaps` exit 2 for bad arguments: a retry would fail the same way.
BAD_ARGUMENTS = 2
#: Output kept in a failure's message (the whole output is in the task log already).
_TAIL_CHARS = 2000


class CommandFailed(Exception):
    """A command exited non-zero; `final` when a retry cannot help."""

    def __init__(self, argv: Sequence[str], status: int, output: str, final: bool) -> None:
        tail = output[-_TAIL_CHARS:].strip()
        super().__init__(f"{Path(argv[0]).name} {' '.join(argv[1:])} exited {status}: {tail}")
        self.status = status
        self.final = final


def project_dir() -> Path:
    return Path(os.environ.get("STOCKSTREAM_PROJECT_DIR") or Path(__file__).resolve().parents[2])


def stockstream_bin() -> str:
    return os.environ.get("STOCKSTREAM_BIN") or str(project_dir() / ".venv" / "bin" / "stockstream")


def dbt_script() -> str:
    return str(project_dir() / "scripts" / "dbt.sh")


def run(
    argv: Sequence[str],
    *,
    final_statuses: Collection[int] = (),
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run `argv` in the project directory; its stderr (JSON logs, dbt's output) goes to the
    task log line by line, its stdout is returned. Raises `CommandFailed`."""
    log.info("running %s", " ".join(argv))
    done = subprocess.run(
        list(argv),
        cwd=project_dir(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    for line in done.stderr.splitlines():
        log.info("%s", line)
    if done.returncode != 0:
        for line in done.stdout.splitlines():
            log.info("%s", line)
        raise CommandFailed(
            argv,
            done.returncode,
            done.stderr + done.stdout,
            final=done.returncode in final_statuses,
        )
    return done.stdout


def stockstream_json(*args: str) -> dict[str, Any]:
    """`stockstream <args> --json`: its one JSON object (bad arguments are final)."""
    out = run([stockstream_bin(), *args, "--json"], final_statuses=(BAD_ARGUMENTS,))
    value = json.loads(out)
    if not isinstance(value, dict):
        raise ValueError(f"stockstream {args[0]} --json printed {type(value).__name__}")
    return value


def dbt(*args: str) -> str:
    """`scripts/dbt.sh <args>`: dbt's log lines go to the task log."""
    # Colour codes would clutter the task log.
    out = run([dbt_script(), *args], env={"DBT_USE_COLORS": "false"})
    for line in out.splitlines():
        log.info("%s", line)
    return out
