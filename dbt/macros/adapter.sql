{#- Where DuckDB and BigQuery spell the same thing differently. Each macro dispatches on the
    adapter (duckdb__/bigquery__), so a model is written once and runs on both targets. -#}

{#- A timestamp as epoch milliseconds (BIGINT / INT64). -#}
{% macro epoch_ms(expr) -%}{{ return(adapter.dispatch('epoch_ms', 'stockstream')(expr)) }}{%- endmacro %}
{% macro duckdb__epoch_ms(expr) -%}epoch_ms({{ expr }}){%- endmacro %}
{% macro bigquery__epoch_ms(expr) -%}unix_millis({{ expr }}){%- endmacro %}

{#- Epoch milliseconds as a UTC timestamp (DuckDB: naive TIMESTAMP in UTC, as the warehouse). -#}
{% macro from_epoch_ms(expr) -%}{{ return(adapter.dispatch('from_epoch_ms', 'stockstream')(expr)) }}{%- endmacro %}
{% macro duckdb__from_epoch_ms(expr) -%}make_timestamp(cast({{ expr }} as bigint) * 1000){%- endmacro %}
{% macro bigquery__from_epoch_ms(expr) -%}timestamp_millis(cast({{ expr }} as int64)){%- endmacro %}

{#- A UTC instant (DuckDB TIMESTAMPTZ from Parquet's timestamp[ms, UTC]) as the warehouse's type. -#}
{% macro utc_timestamp(expr) -%}{{ return(adapter.dispatch('utc_timestamp', 'stockstream')(expr)) }}{%- endmacro %}
{% macro duckdb__utc_timestamp(expr) -%}cast(timezone('UTC', {{ expr }}) as timestamp){%- endmacro %}
{% macro bigquery__utc_timestamp(expr) -%}cast({{ expr }} as timestamp){%- endmacro %}

{#- True when the list column holds any of `codes` (none: false). -#}
{% macro has_any(list_expr, codes) -%}{{ return(adapter.dispatch('has_any', 'stockstream')(list_expr, codes)) }}{%- endmacro %}
{% macro duckdb__has_any(list_expr, codes) -%}
  {%- if codes -%}coalesce(list_has_any({{ list_expr }}, [{{ sql_string_list(codes) }}]::varchar[]), false){%- else -%}false{%- endif -%}
{%- endmacro %}
{% macro bigquery__has_any(list_expr, codes) -%}
  {%- if codes -%}exists(select 1 from unnest({{ list_expr }}) as code where code in ({{ sql_string_list(codes) }})){%- else -%}false{%- endif -%}
{%- endmacro %}

{#- The sample standard deviation over a window frame (what the anomaly agent uses). -#}
{% macro stddev_samp(expr) -%}{{ return(adapter.dispatch('stddev_samp', 'stockstream')(expr)) }}{%- endmacro %}
{% macro default__stddev_samp(expr) -%}stddev_samp({{ expr }}){%- endmacro %}

{#- A 64-bit float (dbt.type_float() is a 32-bit REAL on DuckDB, which would round prices). -#}
{% macro type_double() -%}{{ return(adapter.dispatch('type_double', 'stockstream')()) }}{%- endmacro %}
{% macro default__type_double() -%}double{%- endmacro %}
{% macro bigquery__type_double() -%}float64{%- endmacro %}

{#- A timestamp `hours` hours earlier, same type (dbt.dateadd gives a DATETIME on BigQuery, which
    does not compare with a TIMESTAMP). -#}
{% macro hours_before(expr, hours) -%}{{ return(adapter.dispatch('hours_before', 'stockstream')(expr, hours)) }}{%- endmacro %}
{% macro default__hours_before(expr, hours) -%}({{ expr }}) - interval '{{ hours | int }} hours'{%- endmacro %}
{% macro bigquery__hours_before(expr, hours) -%}timestamp_sub({{ expr }}, interval {{ hours | int }} hour){%- endmacro %}

{#- A deterministic, null-safe text of a quote's content, hashed (hex MD5, via dbt.hash): equal
    content, equal fingerprint. Each value is written out in full (a double as its shortest
    round-trip text, a list as JSON, so no separator inside a condition code can make two
    contents read alike) and a null as `null`, which no written value equals; a null list
    counts as an empty one (BigQuery has no null arrays: the archive's nulls load as []). -#}
{% macro content_fingerprint(doubles, lists=[]) -%}
  {%- set parts = [] -%}
  {%- for expr in doubles -%}
    {%- do parts.append("coalesce(cast(" ~ expr ~ " as " ~ dbt.type_string() ~ "), 'null')") -%}
  {%- endfor -%}
  {%- for expr in lists -%}
    {%- do parts.append(list_as_json(expr)) -%}
  {%- endfor -%}
  {%- set joined = [] -%}
  {%- for part in parts -%}
    {%- do joined.append(part) -%}
    {%- if not loop.last %}{% do joined.append("'|'") %}{% endif -%}
  {%- endfor -%}
  {{- dbt.hash(dbt.concat(joined)) -}}
{%- endmacro %}

{#- A list of strings as JSON text (null: `[]`). -#}
{% macro list_as_json(expr) -%}{{ return(adapter.dispatch('list_as_json', 'stockstream')(expr)) }}{%- endmacro %}
{% macro duckdb__list_as_json(expr) -%}cast(to_json(coalesce({{ expr }}, []::varchar[])) as varchar){%- endmacro %}
{% macro bigquery__list_as_json(expr) -%}to_json_string(ifnull({{ expr }}, cast([] as array<string>))){%- endmacro %}
