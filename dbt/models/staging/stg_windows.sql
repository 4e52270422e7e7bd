-- The warehouse's windows as loaded: at-least-once on BigQuery (a window may be here twice),
-- one row per key on DuckDB (the loader upserts). silver_windows deduplicates.
select
    symbol,
    window_start,
    window_end,
    window_start_ms,
    {{ adapter.quote('count') }} as quote_count,
    {{ adapter.quote('sum') }} as price_sum,
    {{ adapter.quote('min') }} as low,
    {{ adapter.quote('max') }} as high,
    avg as price_avg,
    open,
    close,
    volume,
    vwap,
    first_event_ms,
    last_event_ms,
    ingested_at
from {{ source('warehouse', 'aggregates_1m') }}
