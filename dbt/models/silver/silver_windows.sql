-- One row per (symbol, window_start): a window the stream re-emitted or BigQuery's best-effort
-- dedupe let through twice is kept once, the latest ingested_at winning (ties: the later
-- close time, so the choice never depends on the scan order).
with ranked as (
    select
        *,
        row_number() over (
            partition by symbol, window_start
            order by ingested_at desc, last_event_ms desc, quote_count desc
        ) as delivery
    from {{ ref('stg_windows') }}
)

select
    symbol,
    window_start,
    window_end,
    window_start_ms,
    cast(window_start as date) as trading_day,
    quote_count,
    price_sum,
    price_avg,
    open,
    high,
    low,
    close,
    volume,
    vwap,
    first_event_ms,
    last_event_ms,
    ingested_at
from ranked
where delivery = 1
