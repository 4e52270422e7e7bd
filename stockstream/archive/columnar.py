"""The archive's batches column-wise: `stock-quotes` records -> one Arrow table of valid quotes
-> one table per object, the same objects parquet.py's row functions make.

Why: the archive runs in the worker's process, and the row path spent about 16 us of Python per
record (validation, a `Quote`, an `ArchiveRow`, one `getattr` per cell) while the aggregation
waited for the GIL; this path spends about 4 (orjson per record, then one Arrow array and a few
vectorised checks per field, which run without the GIL).

`parse_table` classifies every record exactly as `QuoteValidator.parse` does and gives the same
values. Records the column-wise checks do not pass or cannot judge (anything unusual: a bool or
a string where a number belongs, a float timestamp, an integer beyond int64, a failed check) go
through the validator itself one by one, so the vectorised checks only ever decide the plain
case, and rejections carry the validator's own errors. tests/unit/test_parquet.py compares the
two paths byte for byte, on hand-picked and on generated records.

The checks mirror the contract's rules (contracts/quotes.py) and use its own bounds
(`OPTIONAL_NUMBERS`, `parse_conditions`), so a change of the contract shows up here too; the
equivalence tests fail if the two drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from stockstream.archive.parquet import (
    BATCH_KIND,
    SCHEMA,
    event_hour,
    object_key,
    parse_records,
    to_table,
)
from stockstream.contracts.quotes import (
    MAX_PRICE,
    MAX_VOLUME,
    OPTIONAL_NUMBERS,
    ContractError,
    QuoteValidator,
    Source,
    parse_conditions,
)
from stockstream.contracts.timestamps import MAX_EPOCH_MS, MIN_EPOCH_MS

_TS = SCHEMA.field("market_timestamp").type
_HOUR_MS = 3_600_000
_NONE = type(None)
_NUMBER_TYPES: frozenset[type] = frozenset({int, float, _NONE})
_INT_TYPES: frozenset[type] = frozenset({int, _NONE})
_STR_TYPES: frozenset[type] = frozenset({str, _NONE})
_SOURCES = pa.array(sorted(s.value for s in Source), type=pa.string())
#: `now` of a record without a Kafka timestamp (parse_records: nothing is too far ahead of it).
_NO_TIMESTAMP_NOW = 2**62
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_value, _timestamp = attrgetter("value"), attrgetter("timestamp")


def _kafka_timestamps(records: Sequence[Any]) -> list[int | None]:
    return [t if t is not None and t >= 0 else None for t in map(_timestamp, records)]


class _Columns:
    """The decoded JSON objects of a batch, column by column, with the rows whose value has a
    type the column-wise checks do not handle marked in `odd` (the validator judges those)."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects
        self.odd = bytearray(len(objects))

    def get(self, name: str, types: frozenset[type], arrow: pa.DataType) -> pa.Array:
        values = list(map(dict.get, self.objects, repeat(name)))
        if not set(map(type, values)) <= types:  # `type`, not isinstance: bool is not a number
            for i, value in enumerate(values):
                if type(value) not in types:
                    self.odd[i] = 1
                    values[i] = None
        try:
            return pa.array(values, type=arrow)
        except (pa.ArrowInvalid, OverflowError):  # an integer beyond int64
            for i, value in enumerate(values):
                if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
                    self.odd[i] = 1
                    values[i] = None
            return pa.array(values, type=arrow)


def _in_range(values: pa.Array, low: float, high: float) -> pa.Array:
    """True where the (non-null) number is finite and in [low, high]."""
    finite = pc.is_finite(values) if pa.types.is_floating(values.type) else pc.is_valid(values)
    return pc.and_(finite, pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high)))


def _optional(values: pa.Array, check: pa.Array) -> pa.Array:
    """Null (absent) passes; a present value must pass `check`."""
    return pc.or_kleene(pc.is_null(values), check)


def _symbols_ok(symbols: pa.Array, validator: QuoteValidator) -> pa.Array:
    good = []
    for symbol in pc.unique(symbols.drop_null()).to_pylist():  # a batch has few symbols
        try:
            validator.check_symbol(symbol)
        except ContractError:
            continue
        good.append(symbol)
    return pc.is_in(symbols, pa.array(good, type=pa.string()))


def _conditions_column(columns: _Columns) -> tuple[list[Any], pa.Array | None]:
    """The conditions column, and which rows' codes pass the contract (None: all absent)."""
    values = list(map(dict.get, columns.objects, repeat("conditions")))
    if set(map(type, values)) <= {_NONE}:
        return values, None
    verdicts: dict[tuple[Any, ...], bool] = {}  # a feed repeats a few code lists
    ok: list[bool] = []
    for i, value in enumerate(values):
        if value is None:
            ok.append(True)
            continue
        if type(value) is not list:
            columns.odd[i] = 1
            values[i] = None
            ok.append(False)
            continue
        try:
            codes = tuple(value)
            verdict = verdicts.get(codes)
        except TypeError:  # a dict or list among the codes: unhashable
            codes, verdict = (), None
            columns.odd[i] = 1
        if verdict is None:
            try:
                parse_conditions({"conditions": value})
            except ContractError:
                verdict = False
            else:
                verdict = True
            if codes:
                verdicts[codes] = verdict
        if not verdict:
            values[i] = None
        ok.append(verdict)
    return values, pa.array(ok, type=pa.bool_())


def parse_table(
    records: Sequence[Any], validator: QuoteValidator, max_future_ms: int
) -> tuple[pa.Table, list[tuple[Any, ContractError]]]:
    """`to_table` of `parse_records(records, validator)`'s rows (rows in another order: the
    objects sort them), and the same rejected records with the same errors, column-wise.

    `max_future_ms` must be the validator's QUOTE_MAX_FUTURE_SECONDS in ms. Records the
    column-wise checks do not pass (or cannot judge) go through `QuoteValidator.parse` one by
    one; any unexpected failure of the column-wise path sends the whole batch that way."""
    try:
        return _parse_table(records, validator, max_future_ms)
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError, ValueError):
        rows, rejected = parse_records(records, validator)
        return to_table(rows), rejected


def _parse_table(
    records: Sequence[Any], validator: QuoteValidator, max_future_ms: int
) -> tuple[pa.Table, list[tuple[Any, ContractError]]]:
    objects: list[dict[str, Any]] = []
    kept: list[int] = []  # objects[i] is records[kept[i]]
    slow: list[int] = []  # indexes into records the validator judges
    loads, json_error = orjson.loads, orjson.JSONDecodeError
    for i, value in enumerate(map(_value, records)):
        try:
            data = loads(value)
        except (json_error, TypeError):  # TypeError: a tombstone (None)
            slow.append(i)
            continue
        if type(data) is dict:
            objects.append(data)
            kept.append(i)
        else:
            slow.append(i)
    chosen = [records[i] for i in kept]
    columns = _Columns(objects)
    symbol = columns.get("symbol", _STR_TYPES, pa.string())
    price = columns.get("current_price", _NUMBER_TYPES, pa.float64())
    market_ts = columns.get("market_timestamp", _INT_TYPES, pa.int64())
    source = columns.get("source", _STR_TYPES, pa.string())
    volume = columns.get("volume", _NUMBER_TYPES, pa.float64())
    fetched_at = columns.get("fetched_at", _INT_TYPES, pa.int64())
    extra = {
        name: columns.get(name, _NUMBER_TYPES, pa.float64()) for name, _, _ in OPTIONAL_NUMBERS
    }
    conditions, conditions_ok = _conditions_column(columns)
    kafka_ts = _kafka_timestamps(chosen)
    now = pa.array([_NO_TIMESTAMP_NOW if t is None else t for t in kafka_ts], type=pa.int64())
    keys = pa.array([r.key for r in chosen], type=pa.binary())

    checks = [
        pa.array([not odd for odd in columns.odd], type=pa.bool_()) if any(columns.odd) else None,
        _symbols_ok(symbol, validator),
        pc.equal(keys, symbol.cast(pa.binary())),
        pc.and_(_in_range(price, -float("inf"), MAX_PRICE), pc.greater(price, 0.0)),
        _in_range(market_ts, MIN_EPOCH_MS, MAX_EPOCH_MS),
        pc.less_equal(market_ts, pc.add_checked(now, max_future_ms)),
        pc.is_in(source, _SOURCES),
        _optional(volume, _in_range(volume, 0.0, MAX_VOLUME)),
        _optional(fetched_at, _in_range(fetched_at, MIN_EPOCH_MS, MAX_EPOCH_MS)),
        *(_optional(extra[n], _in_range(extra[n], lo, hi)) for n, lo, hi in OPTIONAL_NUMBERS),
        pc.invert(pc.less(extra["day_high"], extra["day_low"]).fill_null(False)),
        conditions_ok,
    ]
    ok = pa.array([True] * len(objects), type=pa.bool_())
    for check in checks:
        if check is not None:
            ok = pc.and_(ok, check.fill_null(False))
    arrays = [
        symbol,
        price,
        market_ts.cast(_TS),
        source,
        volume,
        fetched_at.cast(_TS),
        *extra.values(),
        pa.array(conditions, type=pa.list_(pa.string())),
        pa.array([r.partition for r in chosen], type=pa.int32()),
        pa.array([r.offset for r in chosen], type=pa.int64()),
        pa.array(kafka_ts, type=_TS),
    ]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA).filter(ok)
    if not pc.all(ok).as_py():
        slow.extend(kept[i] for i in pc.indices_nonzero(pc.invert(ok)).to_pylist())
    if not slow:
        return table, []
    rows, rejected = parse_records([records[i] for i in sorted(slow)], validator)
    if rows:
        table = pa.concat_tables([table, to_table(rows)])
    return table, rejected


def split_table(topic: str, table: pa.Table, kind: str = BATCH_KIND) -> list[tuple[str, pa.Table]]:
    """`split_by_hour` for a table of ONE partition's rows: (key, rows sorted by offset) per
    UTC event hour, in key order."""
    if table.num_rows == 0:
        return []
    partitions = pc.unique(table.column("kafka_partition")).to_pylist()
    if len(partitions) > 1:
        raise ValueError(f"rows of several partitions in one batch: {sorted(partitions)}")
    hours = pc.divide(table.column("market_timestamp").cast(pa.int64()), _HOUR_MS)
    order = pc.sort_indices(
        pa.table({"hour": hours, "offset": table.column("kafka_offset")}),
        sort_keys=[("hour", "ascending"), ("offset", "ascending")],
    )
    ordered = table.take(order).combine_chunks()
    counts = pc.value_counts(pc.take(hours, order))  # sorted input: in ascending hour order
    out = []
    start = 0
    for entry in counts.to_pylist():
        epoch_hour, count = entry["values"], entry["counts"]
        group = ordered.slice(start, count)
        start += count
        offsets = group.column("kafka_offset")
        date, hour = event_hour(epoch_hour * _HOUR_MS)
        first, last = offsets[0].as_py(), offsets[-1].as_py()
        out.append((object_key(topic, date, hour, partitions[0], first, last, kind), group))
    return out
