{#- The one-minute windows recomputed from silver_quotes with the worker's rules (README,
    "One-minute windows: the rules"), to reconcile with what the stream wrote (the
    `matches_recomputed_windows` test on silver_windows). Applied, from the settings:

    - tumbling windows of AGG_WINDOW_SECONDS on event time, per symbol;
    - lateness: a partition's watermark is the event time that AGG_WATERMARK_QUORUM of its
      symbols have reached (all of them when the partition has fewer symbols in the data),
      and a quote is late, left out, when it comes (in offset order) after the watermark of
      its partition reached its window's end + AGG_GRACE_SECONDS. A symbol reaches a time at
      the first offset whose quote is at or after it, so the watermark reaches a threshold at
      the quorum-th smallest of those offsets;
    - trade conditions: quotes carrying a code of AGG_EXCLUDED_CONDITIONS add volume and event
      times, not prices, unless all of the window's quotes carry one;
    - open/close: first/last price by event time, ties by offset (first for open, last for
      close); vwap over the price-setting quotes with a volume.

    Not applied: the idle flush (quotes of a symbol after its windows were flushed for
    idleness are late in the stream, not here: the reconciliation reports such a window), and
    duplicate deliveries of one quote (silver keeps one; the stream counted each). -#}
{%- set window_ms = (stockstream_setting('window_seconds', '60') | int) * 1000 -%}
{%- set grace_ms = stockstream_setting('grace_ms', '5000') | int -%}
{%- set quorum = stockstream_setting('watermark_quorum', '2') | int -%}
{%- set excluded = excluded_conditions() -%}

with quotes as (
    select
        symbol,
        kafka_partition as part,
        kafka_offset as off,
        market_timestamp_ms as ts,
        cast(floor(market_timestamp_ms / {{ window_ms }}) as {{ dbt.type_bigint() }}) * {{ window_ms }} as window_start_ms,
        current_price as price,
        volume,
        not {{ has_any('conditions', excluded) }} as sets_price
    from {{ ref('silver_quotes') }}
    {%- if reconcile_cutoff_ms() is not none %}
    where market_timestamp_ms >= {{ reconcile_cutoff_ms() }}
    {%- endif %}
),

-- Each quote that raises its symbol's progress in its partition: thresholds in
-- (reached_from, reached_to] are first reached at its offset.
progress as (
    select
        part,
        symbol,
        off,
        coalesce(max(ts) over (
            partition by part, symbol order by off rows between unbounded preceding and 1 preceding
        ), -1) as reached_from,
        max(ts) over (partition by part, symbol order by off rows unbounded preceding) as reached_to
    from quotes
),

steps as (
    select * from progress where reached_to > reached_from
),

partition_windows as (
    select distinct part, window_start_ms, window_start_ms + {{ window_ms + grace_ms }} as threshold_ms
    from quotes
),

symbols_per_partition as (
    select part, count(distinct symbol) as symbols from quotes group by part
),

first_reach as (
    select
        w.part,
        w.window_start_ms,
        s.off,
        row_number() over (partition by w.part, w.window_start_ms order by s.off) as reach_rank
    from partition_windows as w
    inner join steps as s
        on s.part = w.part
        and w.threshold_ms > s.reached_from
        and w.threshold_ms <= s.reached_to
),

-- The offset after which a quote of that window (in that partition) is late; none: the
-- watermark never reached it (the window closed on idleness or is still open).
closing as (
    select r.part, r.window_start_ms, r.off as closed_at_offset
    from first_reach as r
    inner join symbols_per_partition as n on n.part = r.part
    where r.reach_rank = least({{ quorum }}, n.symbols)
),

on_time as (
    select q.*
    from quotes as q
    left join closing as c
        on c.part = q.part and c.window_start_ms = q.window_start_ms
    where c.closed_at_offset is null or q.off <= c.closed_at_offset
),

priced as (
    -- The quotes that set the window's prices: those without an excluded condition, or all of
    -- them when every quote of the window carries one.
    select
        o.*,
        sum(case when sets_price then 1 else 0 end) over (partition by symbol, window_start_ms) as priced_quotes
    from on_time as o
),

price_setting as (
    select
        *,
        row_number() over (partition by symbol, window_start_ms order by ts, off) as open_rank,
        row_number() over (partition by symbol, window_start_ms order by ts desc, off desc) as close_rank
    from priced
    where sets_price or priced_quotes = 0
),

prices as (
    select
        symbol,
        window_start_ms,
        count(*) as quote_count,
        sum(price) as price_sum,
        avg(price) as price_avg,
        min(price) as low,
        max(price) as high,
        max(case when open_rank = 1 then price end) as open,
        max(case when close_rank = 1 then price end) as close,
        sum(case when volume is not null then price * volume end) as price_volume,
        sum(volume) as priced_volume
    from price_setting
    group by symbol, window_start_ms
),

totals as (
    select
        symbol,
        window_start_ms,
        sum(volume) as volume,
        min(ts) as first_event_ms,
        max(ts) as last_event_ms
    from on_time
    group by symbol, window_start_ms
)

select
    p.symbol,
    {{ from_epoch_ms('p.window_start_ms') }} as window_start,
    p.window_start_ms,
    p.quote_count,
    p.price_sum,
    p.price_avg,
    p.open,
    p.high,
    p.low,
    p.close,
    t.volume,
    case when p.priced_volume <> 0 then p.price_volume / p.priced_volume end as vwap,
    t.first_event_ms,
    t.last_event_ms
from prices as p
inner join totals as t
    on t.symbol = p.symbol and t.window_start_ms = p.window_start_ms
