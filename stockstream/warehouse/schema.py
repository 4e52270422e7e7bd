"""The warehouse table, derived from the window contract (contracts/windows.py `FIELDS`).

One row per `(symbol, window_start)`: the contract's fields in contract order (timestamps as
UTC TIMESTAMPs) plus `ingested_at`, when the row was written (a re-sent window has a later one,
which is how the models keep the latest copy). Each back-end asks this module for its types
instead of listing the columns again.
"""

from __future__ import annotations

from dataclasses import dataclass

from stockstream.contracts.windows import FIELDS, Field, Kind

KEY = ("symbol", "window_start")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind
    nullable: bool
    description: str


INGESTED_AT = Column(
    "ingested_at",
    Kind.TIMESTAMP,
    False,
    "When the row was written (a re-sent window has a later one)",
)


def _column(field: Field) -> Column:
    return Column(field.name, field.kind, field.nullable, field.description)


#: Table columns in order: the contract's fields, then `ingested_at`.
COLUMNS: tuple[Column, ...] = (*(_column(f) for f in FIELDS), INGESTED_AT)
CONTRACT_COLUMNS: tuple[Column, ...] = COLUMNS[:-1]

_DUCKDB = {
    Kind.STRING: "VARCHAR",
    Kind.TIMESTAMP: "TIMESTAMP",
    Kind.INTEGER: "BIGINT",
    Kind.NUMBER: "DOUBLE",
}
_BIGQUERY = {
    Kind.STRING: "STRING",
    Kind.TIMESTAMP: "TIMESTAMP",
    Kind.INTEGER: "INT64",
    Kind.NUMBER: "FLOAT64",
}


def duckdb_type(column: Column) -> str:
    return _DUCKDB[column.kind] + ("" if column.nullable else " NOT NULL")


def bigquery_type(column: Column) -> str:
    return _BIGQUERY[column.kind]


def bigquery_mode(column: Column) -> str:
    return "NULLABLE" if column.nullable else "REQUIRED"
