{#- One row per symbol and UTC day, from the closed windows. Open and close are the first and
    last window's; VWAP weights each window's VWAP by its volume. That equals the day's
    Σ(price·volume)/Σvolume unless a window has volume from trades that do not set prices
    (AGG_EXCLUDED_CONDITIONS: they count in `volume`, not in `vwap`). -#}
with windows as (
    select
        *,
        row_number() over (partition by symbol, trading_day order by window_start) as first_rank,
        row_number() over (partition by symbol, trading_day order by window_start desc) as last_rank
    from {{ ref('silver_windows') }}
),

days as (
    select
        symbol,
        trading_day,
        min(window_start) as first_window_start,
        max(window_start) as last_window_start,
        count(*) as window_count,
        sum(quote_count) as quote_count,
        max(case when first_rank = 1 then open end) as open,
        max(high) as high,
        min(low) as low,
        max(case when last_rank = 1 then close end) as close,
        sum(volume) as volume,
        sum(case when vwap is not null and volume > 0 then vwap * volume end)
            / nullif(sum(case when vwap is not null and volume > 0 then volume end), 0) as vwap
    from windows
    group by symbol, trading_day
)

select
    *,
    close / open - 1 as intraday_return,
    close / lag(close) over (partition by symbol order by trading_day) - 1 as daily_return,
    lag(trading_day) over (partition by symbol order by trading_day) as previous_trading_day
from days
