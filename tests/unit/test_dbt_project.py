"""The dbt project (dbt/) without services: it parses, both targets compile (BigQuery offline),
and scripts/dbt.sh hands the project's settings to the models. Needs .venv-dbt, which
scripts/bootstrap.sh creates."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import duckdb

from tests.conftest import ROOT

DBT_SH = ROOT / "scripts" / "dbt.sh"


def dbt(tmp_path: Path, *argv: str, **env: str) -> dict[str, Any]:
    """Run scripts/dbt.sh in an isolated data dir and target path; its manifest."""
    assert (ROOT / ".venv-dbt" / "bin" / "dbt").exists(), "run scripts/bootstrap.sh"
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    target = tmp_path / "target"
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGG_", "ANOMALY_", "BQ_", "DBT_", "DUCKDB_", "S3_", "STOCKSTREAM_"))
    }
    done = subprocess.run(
        [str(DBT_SH), *argv],
        cwd=tmp_path,  # settings from this environment only: no .env of the checkout's
        env={
            **base,
            "STOCKSTREAM_CONFIG_DIR": str(ROOT / "config"),
            "STOCKSTREAM_DATA_DIR": str(data),
            "DBT_TARGET_PATH": str(target),
            "DBT_LOG_PATH": str(target / "logs"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    manifest: dict[str, Any] = json.loads((target / "manifest.json").read_text())
    return manifest


def compiled(tmp_path: Path, model: str, folder: str) -> str:
    path = tmp_path / "target" / "compiled" / "stockstream" / "models" / folder / f"{model}.sql"
    return path.read_text()


def test_the_project_parses_with_a_test_beside_every_model_and_the_exposures(
    tmp_path: Path,
) -> None:
    manifest = dbt(tmp_path, "parse")
    models = {n["name"]: n for n in manifest["nodes"].values() if n["resource_type"] == "model"}
    assert set(models) == {
        "stg_quotes",
        "stg_windows",
        "silver_quotes",
        "silver_windows",
        "gold_daily_summary",
        "gold_anomalies",
        "audit_windows_recomputed",
    }
    tested = {
        parent
        for n in manifest["nodes"].values()
        if n["resource_type"] in ("test", "unit_test")
        for parent in n["depends_on"]["nodes"]
    }
    for name, node in models.items():
        assert node["description"], name
        assert node["unique_id"] in tested, f"{name} has no test"
    assert {s["name"] for s in manifest["sources"].values()} == {"quotes", "aggregates_1m"}
    for source in manifest["sources"].values():
        assert source["loaded_at_field"] in ("kafka_timestamp", "ingested_at")
        assert source["freshness"]["error_after"]["count"] == 60
    assert {e["name"] for e in manifest["exposures"].values()} == {
        "web_dashboard",
        "stock_anomalies_topic",
    }
    unit_tests = {u["name"] for u in manifest["unit_tests"].values()}
    assert unit_tests == {
        "silver_windows_keeps_the_latest_delivery_of_a_window",
        "recomputed_windows_leave_out_late_quotes_and_excluded_prices",
        "silver_quotes_keeps_distinct_trades_of_one_millisecond_and_drops_redeliveries",
    }
    generic = {
        n["test_metadata"]["name"] for n in manifest["nodes"].values() if "test_metadata" in n
    }
    assert {"unique_combination", "in_range", "expression_is_true", "accepted_symbols"} <= generic
    assert "matches_recomputed_windows" in generic


def test_bigquery_compiles_offline_partitioned_by_day_and_clustered_by_symbol(
    tmp_path: Path,
) -> None:
    manifest = dbt(
        tmp_path,
        "compile",
        "--target",
        "bigquery",
        "--no-introspect",
        "--no-populate-cache",
        BQ_PROJECT="analytics-project",
        BQ_DATASET="stock",
        DBT_BQ_OFFLINE="true",
    )
    silver = manifest["nodes"]["model.stockstream.silver_quotes"]["config"]
    assert silver["partition_by"] == {
        "field": "market_timestamp",
        "data_type": "timestamp",
        "granularity": "day",
    }
    assert silver["cluster_by"] == ["symbol"]
    assert silver["incremental_strategy"] == "merge"
    # The quote's content is part of the key: distinct trades in one millisecond both stay.
    assert silver["unique_key"] == ["symbol", "market_timestamp", "source", "quote_fingerprint"]
    stg = compiled(tmp_path, "stg_windows", "staging")
    assert "from `analytics-project`.`stock`.`aggregates_1m`" in stg
    assert "`count` as quote_count" in stg
    stg_quotes = compiled(tmp_path, "stg_quotes", "staging")
    assert "unix_millis(" in stg_quotes
    assert "to_hex(md5(" in stg_quotes and "to_json_string(ifnull(conditions" in stg_quotes
    assert "`analytics-project`.`stock_analytics`.`silver_quotes`" in compiled(
        tmp_path, "audit_windows_recomputed", "audit"
    )


def test_duckdb_compiles_with_the_settings_scripts_dbt_sh_hands_over(tmp_path: Path) -> None:
    # The profile ATTACHes the warehouse read-only: an empty file stands for it.
    warehouse = tmp_path / "warehouse.duckdb"
    duckdb.connect(str(warehouse)).close()
    manifest = dbt(
        tmp_path,
        "compile",
        "--select",
        "audit_windows_recomputed",
        "gold_anomalies",
        "stg_quotes",
        DUCKDB_PATH=str(warehouse),
        ARCHIVE_LOCAL_DIR=str(tmp_path / "bronze"),
        KAFKA_QUOTES_TOPIC="quotes-x",
        AGG_WATERMARK_QUORUM="3",
        AGG_GRACE_SECONDS="2.5",
        AGG_EXCLUDED_CONDITIONS="12,24",
        ANOMALY_Z_THRESHOLD="4.5",
        ANOMALY_MIN_HISTORY="30",
    )
    assert manifest["nodes"]["model.stockstream.silver_quotes"]["config"]["partition_by"] is None
    audit = compiled(tmp_path, "audit_windows_recomputed", "audit")
    assert "least(3, n.symbols)" in audit
    assert "window_start_ms + 62500 as threshold_ms" in audit
    assert "list_has_any(conditions, ['12', '24']::varchar[])" in audit
    anomalies = compiled(tmp_path, "gold_anomalies", "gold")
    assert "abs((value - mean) / stddev) > 4.5" in anomalies
    assert "history >= 30" in anomalies
    stg = compiled(tmp_path, "stg_quotes", "staging")
    assert f"read_parquet('{tmp_path / 'bronze' / 'quotes-x'}/**/*.parquet'" in stg


def test_excluded_conditions_none_lets_every_trade_set_prices(tmp_path: Path) -> None:
    warehouse = tmp_path / "warehouse.duckdb"
    duckdb.connect(str(warehouse)).close()
    dbt(
        tmp_path,
        "compile",
        "--select",
        "audit_windows_recomputed",
        DUCKDB_PATH=str(warehouse),
        AGG_EXCLUDED_CONDITIONS="none",
    )
    assert "not false as sets_price" in compiled(tmp_path, "audit_windows_recomputed", "audit")
