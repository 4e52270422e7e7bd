{#- Windows whose one-minute return or volume is more than ANOMALY_Z_THRESHOLD sample standard
    deviations from the symbol's trailing mean: the real-time agent's rule (README, "Real-time
    anomalies: the rules") in batch. Each value is judged against the ANOMALY_HISTORY_WINDOWS
    values before it, once there are ANOMALY_MIN_HISTORY of them and they are not all equal. A
    return needs the window right before (after a missing minute there is no return, and none
    joins the history); a window without volume has no volume value. Not reproduced: the agent's
    cool-down (ANOMALY_COOLDOWN_SECONDS), so every anomaly the agent emits is here and this
    table may also hold the ones it suppressed (`within_cooldown` hints which). -#}
{%- set threshold = stockstream_setting('z_threshold', '3.0') | float -%}
{%- set min_history = stockstream_setting('min_history', '20') | int -%}
{%- set history = stockstream_setting('history_windows', '60') | int -%}
{%- set window_ms = (stockstream_setting('window_seconds', '60') | int) * 1000 -%}
{%- set cooldown_ms = (stockstream_setting('cooldown_seconds', '300') | float * 1000) | int -%}

with windows as (
    select
        symbol,
        window_start,
        window_end,
        window_start_ms,
        close,
        volume,
        lag(close) over (partition by symbol order by window_start_ms) as previous_close,
        lag(window_start_ms) over (partition by symbol order by window_start_ms) as previous_start_ms
    from {{ ref('silver_windows') }}
),

observations as (
    select
        symbol, window_start, window_end, window_start_ms, close, volume,
        'return' as kind,
        close / previous_close - 1 as value
    from windows
    where previous_start_ms = window_start_ms - {{ window_ms }}
    union all
    select
        symbol, window_start, window_end, window_start_ms, close, volume,
        'volume' as kind,
        volume as value
    from windows
    where volume is not null
),

judged as (
    select
        *,
        avg(value) over history_frame as mean,
        {{ stddev_samp('value') }} over history_frame as stddev,
        count(value) over history_frame as history
    from observations
    window history_frame as (
        partition by symbol, kind order by window_start_ms
        rows between {{ history }} preceding and 1 preceding
    )
),

anomalies as (
    select
        symbol,
        window_start,
        window_end,
        window_start_ms,
        kind,
        value,
        mean,
        stddev,
        (value - mean) / stddev as z,
        cast({{ threshold }} as {{ type_double() }}) as threshold,
        history,
        close,
        volume
    from judged
    where history >= {{ min_history }}
      and stddev > 0
      and abs((value - mean) / stddev) > {{ threshold }}
)

select
    *,
    coalesce(
        window_start_ms - lag(window_start_ms) over (partition by symbol, kind order by window_start_ms)
            < {{ cooldown_ms }},
        false
    ) as within_cooldown
from anomalies
