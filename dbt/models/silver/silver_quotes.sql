{#- One row per quote: the archive deduplicated on (symbol, market_timestamp, source,
    quote_fingerprint), the first delivery (lowest partition, offset; across runs, the one merged
    first) kept. The fingerprint (stg_quotes) is the quote's content: price, volume, conditions.
    A re-delivery (a producer retry, a DLQ re-drive) repeats the content byte for byte, so it
    collapses; two trades of one symbol in the same millisecond from Finnhub's trade websocket
    (which carries no trade id) share (symbol, market_timestamp, source) but not the content, so
    both stay. Two genuinely identical trades in one millisecond cannot be told from a re-delivery
    and are kept once (the reconciliation with silver_windows then reports their window).
    Incremental: each run merges the quotes that reached Kafka in the last
    `silver_lookback_hours` before the newest one already here, plus re-driven ones (no Kafka
    timestamp), so late and re-driven quotes are not missed. On BigQuery the table is
    partitioned by day on market time and clustered by symbol; DuckDB has neither and gets
    neither. -#}
{{
    config(
        materialized='incremental',
        incremental_strategy='merge',
        unique_key=['symbol', 'market_timestamp', 'source', 'quote_fingerprint'],
        on_schema_change='append_new_columns',
        partition_by=({'field': 'market_timestamp', 'data_type': 'timestamp', 'granularity': 'day'}
                      if target.type == 'bigquery' else none),
        cluster_by=(['symbol'] if target.type == 'bigquery' else none),
    )
}}

with candidates as (
    select *
    from {{ ref('stg_quotes') }}
    {#- `dbt compile --no-introspect` (offline, e.g. for BigQuery without credentials) cannot ask
        whether the table exists: it compiles the full-refresh form. -#}
    {% if flags.INTROSPECT and is_incremental() %}
    where kafka_timestamp is null
       or kafka_timestamp >= (
            select {{ hours_before('max(kafka_timestamp)', var('silver_lookback_hours')) }}
            from {{ this }}
       )
    {% endif %}
),

ranked as (
    select
        *,
        row_number() over (
            partition by symbol, market_timestamp, source, quote_fingerprint
            order by kafka_partition, kafka_offset
        ) as delivery
    from candidates
)

select
    symbol,
    market_timestamp,
    market_timestamp_ms,
    source,
    current_price,
    volume,
    conditions,
    quote_fingerprint,
    fetched_at,
    day_high,
    day_low,
    kafka_partition,
    kafka_offset,
    kafka_timestamp
from ranked
where delivery = 1
{% if flags.INTROSPECT and is_incremental() %}
  -- A quote already here keeps its first delivery: a later copy (a re-drive, a producer retry)
  -- is not merged over it.
  and not exists (
    select 1
    from {{ this }} as existing
    where existing.symbol = ranked.symbol
      and existing.market_timestamp = ranked.market_timestamp
      and existing.source = ranked.source
      and existing.quote_fingerprint = ranked.quote_fingerprint
  )
{% endif %}
