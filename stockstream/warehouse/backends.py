"""The configured warehouse back-end, built (not connected: the first write connects)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stockstream.settings import Settings, SettingsError, WarehouseSettings
from stockstream.warehouse.base import Warehouse


def duckdb_path(settings: Settings) -> Path:
    """`DUCKDB_PATH`; left at its default it follows `STOCKSTREAM_DATA_DIR`, so every data
    folder (each test, each deployment) has its own warehouse file."""
    configured = settings.warehouse.duckdb_path
    default = next(
        f.default for f in dataclasses.fields(WarehouseSettings) if f.name == "duckdb_path"
    )
    if configured is None or str(configured) in ("", str(default)):
        return settings.data_dir / "warehouse.duckdb"
    return Path(configured)


def from_settings(settings: Settings) -> Warehouse:
    """The back-end WAREHOUSE_BACKEND names; `SettingsError` names a setting that cannot work."""
    ws = settings.warehouse
    # Each back-end's client library is imported only when it is the one configured: the
    # BigQuery client alone adds about a second to the worker's start.
    if ws.backend == "duckdb":
        from stockstream.warehouse.duckdb_backend import DuckDBWarehouse

        return DuckDBWarehouse(duckdb_path(settings), hold_connection=ws.duckdb_hold_connection)
    if ws.bq_credentials_file is not None and not Path(ws.bq_credentials_file).is_file():
        raise SettingsError(f"BQ_CREDENTIALS_FILE: no such file {str(ws.bq_credentials_file)!r}")
    if not ws.bq_dataset or not ws.bq_table:
        raise SettingsError("BQ_DATASET and BQ_TABLE must not be empty")
    from stockstream.warehouse.bigquery_backend import BigQueryWarehouse

    return BigQueryWarehouse(
        project=ws.bq_project,
        dataset=ws.bq_dataset,
        table=ws.bq_table,
        location=ws.bq_location,
        credentials_file=ws.bq_credentials_file,
        api_endpoint=ws.bq_api_endpoint,
        retry_deadline_seconds=ws.retry_deadline_seconds,
    )
