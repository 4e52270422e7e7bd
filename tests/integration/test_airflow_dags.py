"""The Airflow DAGs (dags/) in Airflow 3.3 itself (the .venv-airflow scripts/airflow_env.sh
makes, the deployment's deploy/airflow/airflow.cfg, a SQLite metadata database, one
AIRFLOW_HOME for the module): every DAG imports with its schedule, params, owner and retries;
`airflow dags test` runs the reconciliation end to end on a real local archive and DuckDB
warehouse (gaps in two hours filled by two mapped backfills, a second run writes nothing), the
manual backfill with parameters, the dbt build gated on source freshness, and failed tasks
reaching the alert receivers through `stockstream alert`; deploy/airflow/init.sh creates the
documented roles and the auth manager answers for them as deploy/airflow/roles.md says.

No Kafka: the archive is written with the archive's own Parquet code and the warehouse filled
by `stockstream backfill`, then windows are deleted to make the gaps."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stockstream.archive.object_store import LocalDirectoryStore
from tests.conftest import ROOT
from tests.unit.test_backfill import archive, feed

pytestmark = pytest.mark.integration

AIRFLOW = Path(os.environ.get("AIRFLOW_VENV") or ROOT / ".venv-airflow") / "bin" / "airflow"
DAY = "2026-01-05"  # feed() starts at 2026-01-05T14:30Z; 40 minutes reach into the 15:00 hour
RUN_FOR_DAY = "2026-01-06T00:30:00+00:00"  # the scheduled run that reconciles DAY
FULL_RANGE = ("2026-01-05T14:00Z", "2026-01-05T16:00Z")
#: Windows deleted from the warehouse: gaps in two UTC hours, so two mapped backfills.
DELETED = [
    ("AAA", "2026-01-05 14:35:00"),
    ("BBB", "2026-01-05 14:50:00"),
    ("CCC", "2026-01-05 15:05:00"),
    ("AAA", "2026-01-05 15:06:00"),
]
SLACK_PATH = "/services/T0/B0/airflow-test-secret"


@dataclass
class Receiver:
    """A local Slack-compatible webhook recording what it gets."""

    port: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Airflow:
    env: dict[str, str]
    home: Path
    data: Path
    receiver: Receiver

    def run(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(AIRFLOW), *argv],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def dags_test(
        self,
        dag_id: str,
        logical_date: str,
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        extra = ["-c", json.dumps(conf)] if conf is not None else []
        return self.run("dags", "test", dag_id, logical_date, *extra, env=env)

    def task_states(self, dag_id: str, logical_date: str) -> dict[str, list[str]]:
        """{task_id: states of its instances (one per map index)} of the run at that date."""
        with sqlite3.connect(self.home / "airflow.db") as db:
            rows = db.execute(
                "SELECT ti.task_id, ti.state FROM task_instance ti JOIN dag_run r"
                " ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id"
                " WHERE r.dag_id = ? AND r.logical_date LIKE ? ORDER BY ti.map_index",
                (dag_id, logical_date.replace("T", " ").replace("+00:00", "") + "%"),
            ).fetchall()
        states: dict[str, list[str]] = {}
        for task_id, state in rows:
            states.setdefault(task_id, []).append(state)
        return states

    def stockstream(self, *argv: str) -> dict[str, Any]:
        done = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "stockstream"), *argv, "--json"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        value: dict[str, Any] = json.loads(done.stdout)
        return value


def _serve(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.posts.append({"path": self.path, **json.loads(body)})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # the URL is a secret
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    # Creates the Airflow venv on a fresh clone (~1 min), a no-op afterwards (stamp file).
    subprocess.run([str(ROOT / "scripts" / "airflow_env.sh")], check=True, timeout=1200)
    home = tmp_path_factory.mktemp("airflow-home")
    data = tmp_path_factory.mktemp("stockstream-data")
    store = LocalDirectoryStore(data / "archive", fsync=False)
    store.ensure_ready()
    archive(store, feed(minutes=40))
    receiver = Receiver()
    server = _serve(receiver)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ALERT_"))}
    env = {
        **inherited,
        # The deployment's configuration (FAB auth manager, roles), this checkout's DAGs and
        # a SQLite metadata database of our own.
        "AIRFLOW_CONFIG": str(ROOT / "deploy" / "airflow" / "airflow.cfg"),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_BIN": str(AIRFLOW),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        # The embedded defaults: local archive, DuckDB warehouse, in a data dir of our own.
        "STOCKSTREAM_DATA_DIR": str(data),
        "ARCHIVE_LOCAL_DIR": str(data / "archive"),
        "S3_ENDPOINT": "",
        "WAREHOUSE_BACKEND": "duckdb",
        "DUCKDB_PATH": str(data / "warehouse.duckdb"),
        # The window rules feed() was made for (tests/unit/test_backfill.py RULES).
        "AGG_WINDOW_SECONDS": "60",
        "AGG_GRACE_SECONDS": "5",
        "AGG_WATERMARK_QUORUM": "2",
        "AGG_EXCLUDED_CONDITIONS": "12",
        "AGG_IDLE_TIMEOUT_SECONDS": "30",
        "LOG_FORMAT": "json",
        # dbt's artifacts and logs out of the checkout (another dbt run may use dbt/target).
        "DBT_TARGET_PATH": str(data / "dbt-target"),
        "DBT_LOG_PATH": str(data / "dbt-logs"),
        "ALERT_SLACK_WEBHOOK_URL": f"http://127.0.0.1:{receiver.port}{SLACK_PATH}",
        "ALERT_MAX_RETRIES": "1",
    }
    flow = Airflow(env, home, data, receiver)
    migrated = flow.run("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    try:
        yield flow
    finally:
        server.shutdown()


def windows(data: Path) -> dict[tuple[str, str], Any]:
    """{(symbol, window_start): ingested_at} of the warehouse."""
    conn = duckdb.connect(str(data / "warehouse.duckdb"), read_only=True)
    try:
        rows = conn.execute(
            "SELECT symbol, strftime(window_start, '%Y-%m-%d %H:%M:%S'), ingested_at"
            " FROM aggregates_1m"
        ).fetchall()
    finally:
        conn.close()
    return {(symbol, start): ingested for symbol, start, ingested in rows}


def fill_then_delete(flow: Airflow, deleted: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """A complete warehouse for the feed, then `deleted` taken out; returns the complete one."""
    flow.stockstream("backfill", "--from", FULL_RANGE[0], "--to", FULL_RANGE[1])
    complete = windows(flow.data)
    conn = duckdb.connect(str(flow.data / "warehouse.duckdb"))
    try:
        for symbol, start in deleted:
            conn.execute(
                "DELETE FROM aggregates_1m WHERE symbol = ? AND window_start = ?", [symbol, start]
            )
    finally:
        conn.close()
    return complete


PROBE = """
import json, sys
sys.path.append(sys.argv[1])  # as Airflow's DAG bundle does
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag in bag.dags.values():
    out["dags"][dag.dag_id] = {
        "schedule": getattr(dag.timetable, "expression", None),
        "tags": sorted(dag.tags),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "params": {k: p.schema for k, p in dag.params.items()},
        "tasks": {
            t.task_id: {
                "owner": t.owner,
                "retries": t.retries,
                "alerts": bool(t.on_failure_callback),
                "trigger_rule": str(t.trigger_rule.value),
            }
            for t in dag.tasks
        },
    }
print(json.dumps(out))
"""


def test_every_dag_imports_with_its_schedule_params_owner_and_retries(airflow: Airflow) -> None:
    done = subprocess.run(
        [str(AIRFLOW.parent / "python"), "-c", PROBE, str(ROOT / "dags")],
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    dags = found["dags"]
    assert set(dags) == {"stockstream_dbt", "stockstream_reconcile", "stockstream_backfill"}
    assert dags["stockstream_dbt"]["schedule"] == "0 * * * *"
    assert dags["stockstream_reconcile"]["schedule"] == "30 0 * * *"
    assert dags["stockstream_backfill"]["schedule"] is None
    assert list(dags["stockstream_dbt"]["tasks"]) == ["source_freshness", "build"]
    assert set(dags["stockstream_reconcile"]["tasks"]) == {"find_gaps", "backfill_hour", "check"}
    assert dags["stockstream_reconcile"]["tasks"]["check"]["trigger_rule"] == "none_failed"
    assert set(dags["stockstream_backfill"]["params"]) == {"from", "to", "symbols"}
    assert dags["stockstream_reconcile"]["params"]["day"]["type"] == ["null", "string"]
    for dag_id, dag in dags.items():
        assert "stockstream" in dag["tags"], dag_id
        assert dag["catchup"] is False and dag["max_active_runs"] == 1, dag_id
        for task_id, task in dag["tasks"].items():
            assert task["owner"] == "stockstream", task_id
            assert task["retries"] == 2, task_id
            assert task["alerts"], f"{dag_id}.{task_id} has no failure alert"


def test_reconciliation_fills_the_gaps_then_writes_nothing(airflow: Airflow) -> None:
    complete = fill_then_delete(airflow, DELETED)
    assert len(complete) == 200
    gaps = airflow.stockstream("gaps", "--day", DAY)["gaps"]
    assert len(gaps) == len(DELETED)

    first = airflow.dags_test("stockstream_reconcile", RUN_FOR_DAY)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
    states = airflow.task_states("stockstream_reconcile", RUN_FOR_DAY)
    assert states == {
        "find_gaps": ["success"],
        "backfill_hour": ["success", "success"],  # 14:00 and 15:00 UTC
        "check": ["success"],
    }
    filled = windows(airflow.data)
    assert set(filled) == set(complete)
    restored = {key for key in filled if filled[key] != complete[key]}
    assert restored == set(DELETED)  # only the missing windows were written

    # The same day again (by hand, `day` param): nothing to map, nothing written.
    again = "2026-01-07T00:30:00+00:00"
    second = airflow.dags_test("stockstream_reconcile", again, {"day": DAY})
    assert second.returncode == 0, second.stdout[-5000:] + second.stderr[-3000:]
    assert airflow.task_states("stockstream_reconcile", again) == {
        "find_gaps": ["success"],
        "backfill_hour": ["skipped"],
        "check": ["success"],
    }
    assert windows(airflow.data) == filled


def test_manual_backfill_with_parameters_and_a_failure_alerted(airflow: Airflow) -> None:
    complete = fill_then_delete(airflow, [("DDD", "2026-01-05 14:40:00")])
    done = airflow.dags_test(
        "stockstream_backfill",
        "2026-01-08T00:00:00+00:00",
        {"from": "2026-01-05T14:40Z", "to": "2026-01-05T14:41Z", "symbols": "DDD"},
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert set(windows(airflow.data)) == set(complete)

    # Bad parameters (`to` before `from`): stockstream exits 2, the task fails at once (no
    # retry) and the failure reaches the alert receiver.
    before = len(airflow.receiver.posts)
    failed = airflow.dags_test(
        "stockstream_backfill",
        "2026-01-09T00:00:00+00:00",
        {"from": "2026-01-05T15:00Z", "to": "2026-01-05T14:00Z"},
    )
    assert failed.returncode != 0
    assert airflow.task_states("stockstream_backfill", "2026-01-09T00:00:00+00:00") == {
        "backfill": ["failed"]
    }
    alerts = airflow.receiver.posts[before:]
    assert len(alerts) == 1
    assert alerts[0]["path"] == SLACK_PATH
    assert alerts[0]["blocks"][0]["text"]["text"] == "Airflow: stockstream_backfill.backfill failed"
    assert "must be after --from" in alerts[0]["blocks"][1]["text"]["text"]


def test_dbt_builds_when_sources_are_fresh_and_not_when_stale(airflow: Airflow) -> None:
    fill_then_delete(airflow, [])
    analytics = airflow.data / "analytics.duckdb"
    # feed()'s quotes reached "Kafka" in January: fresh only with a generous error_after.
    fresh = {"DBT_FRESHNESS_WARN_MINUTES": "99999999", "DBT_FRESHNESS_ERROR_MINUTES": "99999999"}
    built = airflow.dags_test("stockstream_dbt", "2026-01-06T01:00:00+00:00", env=fresh)
    assert built.returncode == 0, built.stdout[-5000:] + built.stderr[-3000:]
    assert airflow.task_states("stockstream_dbt", "2026-01-06T01:00:00+00:00") == {
        "source_freshness": ["success"],
        "build": ["success"],
    }
    conn = duckdb.connect(str(analytics), read_only=True)
    try:
        daily = conn.execute("SELECT count(*) FROM gold_daily_summary").fetchone()
    finally:
        conn.close()
    assert daily == (5,)  # five symbols, one day

    # With the default error_after (60 minutes) the archive is stale: the freshness task fails
    # without retries, the build is not run and the failure is alerted.
    before = len(airflow.receiver.posts)
    stale = airflow.dags_test("stockstream_dbt", "2026-01-06T02:00:00+00:00")
    assert stale.returncode != 0
    assert airflow.task_states("stockstream_dbt", "2026-01-06T02:00:00+00:00") == {
        "source_freshness": ["failed"],
        "build": ["upstream_failed"],
    }
    alerts = airflow.receiver.posts[before:]
    assert [a["blocks"][0]["text"]["text"] for a in alerts] == [
        "Airflow: stockstream_dbt.source_freshness failed"
    ]
    assert "stale sources: source.stockstream.archive.quotes" in alerts[0]["text"]


RBAC_PROBE = """
import json
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder
from airflow.providers.fab.auth_manager.fab_auth_manager import FabAuthManager

with get_application_builder() as appbuilder:
    sm = appbuilder.sm
    manager = FabAuthManager()
    manager.appbuilder = appbuilder
    out = {}
    for role in ("stockstream_viewer", "stockstream_operator"):
        user = sm.find_user(username=role) or sm.add_user(
            role, role, "test", f"{role}@example.invalid", [sm.find_role(role)], "not-used"
        )

        def dag(method, dag_id, entity=None):
            details = DagDetails(id=dag_id) if dag_id else None
            return manager.is_authorized_dag(
                method=method, user=user, access_entity=entity, details=details
            )

        out[role] = {
            "list DAGs": dag("GET", None),
            "read a run's logs": dag("GET", "stockstream_reconcile", DagAccessEntity.TASK_LOGS),
            "read XComs": dag("GET", "stockstream_backfill", DagAccessEntity.XCOM),
            **{
                f"trigger {dag_id}": dag("POST", dag_id, DagAccessEntity.RUN)
                for dag_id in ("stockstream_backfill", "stockstream_reconcile", "stockstream_dbt")
            },
            "clear a task": dag("PUT", "stockstream_reconcile", DagAccessEntity.TASK_INSTANCE),
            "pause stockstream_backfill": dag("PUT", "stockstream_backfill"),
            "trigger another DAG": dag("POST", "someone_elses_dag", DagAccessEntity.RUN),
            "edit connections": manager.is_authorized_connection(method="PUT", user=user),
            "read variables": manager.is_authorized_variable(method="GET", user=user),
            "edit pools": manager.is_authorized_pool(method="PUT", user=user),
        }
print(json.dumps(out))
"""


def test_init_creates_the_documented_roles_with_their_rights(airflow: Airflow) -> None:
    init = subprocess.run(
        [str(ROOT / "deploy" / "airflow" / "init.sh")],
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert init.returncode == 0, init.stdout[-3000:] + init.stderr[-3000:]
    done = subprocess.run(
        [str(AIRFLOW.parent / "python"), "-c", RBAC_PROBE],
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rights = json.loads(done.stdout.strip().splitlines()[-1])
    reading = {"list DAGs", "read a run's logs", "read XComs"}
    operating = {
        "trigger stockstream_backfill",
        "trigger stockstream_reconcile",
        "trigger stockstream_dbt",
        "clear a task",
        "pause stockstream_backfill",
    }
    granted = {role: {k for k, v in answers.items() if v} for role, answers in rights.items()}
    assert granted == {
        "stockstream_viewer": reading,
        "stockstream_operator": reading | operating,
    }
    documented = (ROOT / "deploy" / "airflow" / "roles.md").read_text()
    assert "`stockstream_viewer`" in documented and "`stockstream_operator`" in documented
