"""The warehouse: every closed window of `stock-quotes-aggregated`, one row per
`(symbol, window_start)`. `loader.py` consumes and batches; the back-ends (`duckdb_backend.py`,
the embedded default, and `bigquery_backend.py`) implement `base.Warehouse` with tables derived
from the window contract (`schema.py`); `backends.py` picks the configured one."""
