"""BigQuery as the warehouse: streaming inserts (`tabledata.insertAll`), google-cloud-bigquery.

- The dataset and the table are created when missing (the dataset only if it cannot be read:
  with a pre-created dataset the service account needs no project-level permission). The table
  is partitioned by DAY on `window_start` and clustered by `symbol`.
- Rows go in requests of at most 500 rows and 10 MB, each with the insert id
  `symbol|window_start`: BigQuery drops a repeated insert id best effort (about a minute), so the
  models reading the table still deduplicate on `(symbol, window_start)`.
- `skipInvalidRows`: the valid rows of a request are stored even when others are refused; the
  refused rows (`insertErrors`) are returned as `Rejected` with BigQuery's error, for the
  dead-letter topic. Rows BigQuery did not store for a transient reason are sent again.
- Transient errors (connection errors, 5xx, rate limits) are retried by the client's retry with a
  bounded deadline (`WAREHOUSE_RETRY_DEADLINE_SECONDS`); past it, `WarehouseUnavailable`: the
  agent backs off and sends the same rows again (same insert ids).
- Credentials: `BQ_API_ENDPOINT` set (emulators) -> anonymous; else `BQ_CREDENTIALS_FILE`
  (a service-account key, e.g. a mounted secret file); else application default credentials.

Every client call runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import bigquery

from stockstream.contracts.timestamps import iso_utc
from stockstream.contracts.windows import Kind, WindowRecordError, window_identity
from stockstream.warehouse.base import (
    DedicatedThread,
    Rejected,
    WarehouseUnavailable,
    insert_id,
    record_from_row,
)
from stockstream.warehouse.schema import COLUMNS, CONTRACT_COLUMNS, bigquery_mode, bigquery_type

log = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/bigquery",)
#: BigQuery's streaming limits per insertAll request.
MAX_ROWS_PER_REQUEST = 500
MAX_REQUEST_BYTES = 10_000_000
# The request around the rows: {"rows": [...], "skipInvalidRows": true, ...}.
_ENVELOPE_BYTES = 1_000
# A row not stored because another row of the request was invalid, or for a server-side
# transient reason: send it again.
_RESEND_REASONS = frozenset({"stopped", "backendError", "internalError", "timeout"})
_RESEND_LIMIT = 5
_CONTRACT_NAMES = tuple(c.name for c in CONTRACT_COLUMNS)


def _utc(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)


def table_schema() -> list[bigquery.SchemaField]:
    return [
        bigquery.SchemaField(
            c.name, bigquery_type(c), mode=bigquery_mode(c), description=c.description
        )
        for c in COLUMNS
    ]


@dataclass(frozen=True, slots=True)
class _Row:
    index: int  # into the records given to write()
    insert_id: str
    json: dict[str, Any]
    size: int  # bytes in the request body


def to_bq_row(record: Any, ingested_at: str) -> tuple[str, dict[str, Any]]:
    """(insert id, JSON row). Only the key is checked here: the values go to BigQuery as they
    are, and BigQuery decides (a refused row comes back in `insertErrors`)."""
    symbol, start_ms = window_identity(record)
    row = {name: record[name] for name in _CONTRACT_NAMES if name in record}
    row["window_start"] = iso_utc(start_ms)
    row["ingested_at"] = ingested_at
    return insert_id(symbol, start_ms), row


def chunks(rows: Sequence[_Row]) -> list[list[_Row]]:
    """Requests of at most MAX_ROWS_PER_REQUEST rows and MAX_REQUEST_BYTES bytes, in order."""
    out: list[list[_Row]] = []
    current: list[_Row] = []
    size = _ENVELOPE_BYTES
    for row in rows:
        if current and (
            len(current) >= MAX_ROWS_PER_REQUEST or size + row.size > MAX_REQUEST_BYTES
        ):
            out.append(current)
            current, size = [], _ENVELOPE_BYTES
        current.append(row)
        size += row.size
    if current:
        out.append(current)
    return out


def _describe(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        text = f"{error.get('reason', '?')}: {error.get('message', '')}".strip()
        if error.get("location"):
            text += f" (at {error['location']})"
        parts.append(text)
    return "; ".join(parts) or "rejected without a reason"


class BigQueryWarehouse:
    """`Warehouse` on a BigQuery table, through streaming inserts."""

    name = "bigquery"

    def __init__(
        self,
        *,
        project: str,
        dataset: str,
        table: str,
        location: str = "US",
        credentials_file: Path | str | None = None,
        api_endpoint: str = "",
        retry_deadline_seconds: float = 120.0,
        request_timeout_seconds: float = 30.0,
    ) -> None:
        self.project = project
        self.dataset = dataset
        self.table = table
        self.location = location
        self.credentials_file = Path(credentials_file) if credentials_file else None
        self.api_endpoint = api_endpoint
        self.retry_deadline_seconds = retry_deadline_seconds
        self._timeout = min(request_timeout_seconds, retry_deadline_seconds)
        self._retry: Retry = bigquery.DEFAULT_RETRY.with_timeout(retry_deadline_seconds)
        self._client: bigquery.Client | None = None
        self._table_ready = False
        self._thread = DedicatedThread("bigquery-warehouse")

    @property
    def table_id(self) -> str:
        return f"{self.client().project}.{self.dataset}.{self.table}"

    # -- the interface -------------------------------------------------------------------

    async def write(self, records: Sequence[Mapping[str, Any]]) -> list[Rejected]:
        return await self._thread.run(self._write, list(records))

    async def read(
        self, start_ms: int, end_ms: int, symbols: Collection[str] | None = None
    ) -> list[dict[str, Any]]:
        return await self._thread.run(self._read, start_ms, end_ms, symbols)

    async def close(self) -> None:
        # Not queued behind a write that may be retrying for the whole deadline: closing the
        # HTTP session makes such a write fail at once.
        await asyncio.to_thread(self._close_client)
        self._thread.shutdown()

    # -- on the BigQuery thread ----------------------------------------------------------

    def client(self) -> bigquery.Client:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> bigquery.Client:
        if self.api_endpoint:
            from google.auth.credentials import AnonymousCredentials

            return bigquery.Client(
                project=self.project or None,
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": self.api_endpoint},
                location=self.location or None,
            )
        if self.credentials_file is not None:
            from google.oauth2 import service_account

            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(self.credentials_file), scopes=list(SCOPES)
            )
            return bigquery.Client(
                project=self.project or credentials.project_id,
                credentials=credentials,
                location=self.location or None,
            )
        import google.auth

        credentials, detected = google.auth.default(scopes=list(SCOPES))  # type: ignore[no-untyped-call]
        project = self.project or detected
        if not project:
            raise WarehouseUnavailable(
                "BQ_PROJECT is empty and the application default credentials name no project"
            )
        return bigquery.Client(
            project=project, credentials=credentials, location=self.location or None
        )

    def _close_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()  # type: ignore[no-untyped-call]

    def ensure_table(self) -> bigquery.Table:
        """Get the table, creating the dataset and the table when missing."""
        client = self.client()
        dataset_ref = bigquery.DatasetReference(client.project, self.dataset)
        try:
            client.get_dataset(dataset_ref, retry=self._retry, timeout=self._timeout)
        except gexc.NotFound:
            dataset = bigquery.Dataset(dataset_ref)
            dataset.location = self.location
            client.create_dataset(dataset, exists_ok=True, retry=self._retry, timeout=self._timeout)
            log.info("bigquery dataset created", extra={"dataset": str(dataset_ref)})
        table_ref = dataset_ref.table(self.table)
        try:
            table = client.get_table(table_ref, retry=self._retry, timeout=self._timeout)
        except gexc.NotFound:
            wanted = bigquery.Table(table_ref, schema=table_schema())
            wanted.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field="window_start"
            )
            wanted.clustering_fields = ["symbol"]
            wanted.description = (
                "One-minute stock quote windows from stockstream (stock-quotes-aggregated)."
                " Streaming inserts are at-least-once: deduplicate on (symbol, window_start)."
            )
            table = client.create_table(
                wanted, exists_ok=True, retry=self._retry, timeout=self._timeout
            )
            log.info("bigquery table created", extra={"table": str(table_ref)})
        partitioning = table.time_partitioning
        if (
            partitioning is None
            or partitioning.field != "window_start"
            or list(table.clustering_fields or []) != ["symbol"]
        ):
            log.warning(
                "bigquery table exists with another layout than expected"
                " (DAY partitions on window_start, clustered by symbol)",
                extra={"table": str(table_ref)},
            )
        return table

    def _write(self, records: list[Mapping[str, Any]]) -> list[Rejected]:
        try:
            return self._write_rows(records)
        except WarehouseUnavailable:
            raise
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            raise WarehouseUnavailable(
                f"bigquery refused the credentials ({exc}); the service account needs"
                " roles/bigquery.dataEditor on the dataset (README, Warehouse)"
            ) from exc
        except gexc.RetryError as exc:
            raise WarehouseUnavailable(
                f"bigquery unreachable for {self.retry_deadline_seconds:g}s: {exc.cause!r}"
            ) from exc
        except Exception as exc:  # network, auth transport, 5xx after retries, ...
            raise WarehouseUnavailable(f"bigquery: {exc!r}") from exc

    def _write_rows(self, records: list[Mapping[str, Any]]) -> list[Rejected]:
        if not self._table_ready:
            self.ensure_table()
            self._table_ready = True
        ingested_at = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        rejected: list[Rejected] = []
        rows: list[_Row] = []
        for index, record in enumerate(records):
            try:
                row_id, row = to_bq_row(record, ingested_at)
            except WindowRecordError as exc:
                rejected.append(Rejected(index, str(exc)))
                continue
            size = len(orjson.dumps({"insertId": row_id, "json": row})) + 1
            if size + _ENVELOPE_BYTES > MAX_REQUEST_BYTES:
                rejected.append(Rejected(index, f"row of {size} bytes exceeds the request limit"))
                continue
            rows.append(_Row(index, row_id, row, size))
        pending = chunks(rows)
        resends = 0
        while pending:
            chunk = pending.pop(0)
            try:
                errors = self._insert(chunk)
            except gexc.NotFound as exc:
                # Table (or dataset) deleted under us: create it again on the next attempt.
                self._table_ready = False
                raise WarehouseUnavailable(f"bigquery table {self.table_id} not found") from exc
            except gexc.BadRequest as exc:
                # The request as a whole was refused (too large, one unparsable row): split it
                # until the rows that BigQuery refuses on their own are found.
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    pending[:0] = [chunk[:half], chunk[half:]]
                    continue
                rejected.append(Rejected(chunk[0].index, f"bigquery: {exc.message}"))
                continue
            again: list[_Row] = []
            for error in errors:
                failed = chunk[int(error["index"])]
                details = error.get("errors") or []
                reasons = {e.get("reason") for e in details}
                if reasons and reasons <= _RESEND_REASONS:
                    again.append(failed)
                else:
                    rejected.append(Rejected(failed.index, f"bigquery: {_describe(details)}"))
            if again:
                resends += 1
                if resends > _RESEND_LIMIT:
                    raise WarehouseUnavailable(
                        f"bigquery did not store {len(again)} valid rows after"
                        f" {_RESEND_LIMIT} attempts"
                    )
                time.sleep(min(0.2 * 2**resends, 5.0))
                pending.append(again)
        return sorted(rejected, key=lambda r: r.index)

    def _read(
        self, start_ms: int, end_ms: int, symbols: Collection[str] | None
    ) -> list[dict[str, Any]]:
        """A query job (readers need roles/bigquery.jobUser, README, Warehouse); streaming
        inserts are at-least-once, so the latest `ingested_at` of a key stands for it."""
        columns = ", ".join(
            f"UNIX_MILLIS({c.name}) AS {c.name}" if c.kind is Kind.TIMESTAMP else c.name
            for c in CONTRACT_COLUMNS
        )
        params: list[Any] = [
            bigquery.ScalarQueryParameter("start", "TIMESTAMP", _utc(start_ms)),
            bigquery.ScalarQueryParameter("end", "TIMESTAMP", _utc(end_ms)),
        ]
        where = "window_start >= @start AND window_start < @end"
        if symbols is not None:
            where += " AND symbol IN UNNEST(@symbols)"
            params.append(bigquery.ArrayQueryParameter("symbols", "STRING", sorted(symbols)))
        query = (
            f"SELECT {columns} FROM `{self.table_id}` WHERE {where}"
            " QUALIFY ROW_NUMBER() OVER"
            " (PARTITION BY symbol, window_start ORDER BY ingested_at DESC) = 1"
            " ORDER BY window_start, symbol"
        )
        try:
            job = self.client().query(
                query,
                job_config=bigquery.QueryJobConfig(query_parameters=params),
                retry=self._retry,
                timeout=self._timeout,
            )
            rows = job.result(timeout=self.retry_deadline_seconds)
            return [record_from_row(dict(row.items())) for row in rows]
        except gexc.NotFound:
            return []  # no table yet: nothing stored
        except Exception as exc:  # network, auth, 5xx after retries, a failed job
            raise WarehouseUnavailable(f"bigquery read: {exc!r}") from exc

    def _insert(self, chunk: list[_Row]) -> Sequence[dict[str, Any]]:
        return self.client().insert_rows_json(
            self.table_id,
            [row.json for row in chunk],
            row_ids=[row.insert_id for row in chunk],
            skip_invalid_rows=True,
            retry=self._retry,
            timeout=self._timeout,
        )
