-- The archive's quotes, typed as the warehouse types time (UTC timestamps plus epoch ms) and
-- nothing dropped: duplicates and late quotes are still here (silver_quotes decides).
-- quote_fingerprint is the quote's content (price, volume, trade conditions) hashed: with
-- (symbol, market_timestamp, source) it tells a re-delivery (same content) from a distinct trade
-- in the same millisecond (Finnhub's trades carry no id).
select
    symbol,
    cast(current_price as {{ type_double() }}) as current_price,
    {{ utc_timestamp('market_timestamp') }} as market_timestamp,
    {{ epoch_ms('market_timestamp') }} as market_timestamp_ms,
    source,
    cast(volume as {{ type_double() }}) as volume,
    {{ utc_timestamp('fetched_at') }} as fetched_at,
    day_high,
    day_low,
    conditions,
    {{ content_fingerprint(
        ['cast(current_price as ' ~ type_double() ~ ')', 'cast(volume as ' ~ type_double() ~ ')'],
        ['conditions'],
    ) }} as quote_fingerprint,
    cast(kafka_partition as {{ dbt.type_bigint() }}) as kafka_partition,
    cast(kafka_offset as {{ dbt.type_bigint() }}) as kafka_offset,
    {{ utc_timestamp('kafka_timestamp') }} as kafka_timestamp
from {{ source('archive', 'quotes') }}
