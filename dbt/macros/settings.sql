{#- A project setting: `--vars` first, then the STOCKSTREAM_DBT_<NAME> variable scripts/dbt.sh
    derives from the stockstream settings, then the worker's default. -#}
{% macro stockstream_setting(name, default) -%}
  {{- return(var(name, env_var('STOCKSTREAM_DBT_' ~ (name | upper), default))) -}}
{%- endmacro %}

{#- A comma-separated setting as a list of trimmed, non-empty strings. -#}
{% macro stockstream_list_setting(name, default) -%}
  {%- set raw = stockstream_setting(name, default) -%}
  {%- if raw is string -%}
    {%- set items = [] -%}
    {%- for item in raw.split(',') if item.strip() -%}
      {%- do items.append(item.strip()) -%}
    {%- endfor -%}
    {{- return(items) -}}
  {%- endif -%}
  {{- return(raw | list) -}}
{%- endmacro %}

{#- AGG_EXCLUDED_CONDITIONS; `none` lets every trade set prices, as in the worker. -#}
{% macro excluded_conditions() -%}
  {%- set codes = [] -%}
  {%- for code in stockstream_list_setting('excluded_conditions', '3,5,12,17,24,26,37') if code | lower != 'none' -%}
    {%- do codes.append(code) -%}
  {%- endfor -%}
  {{- return(codes) -}}
{%- endmacro %}

{% macro sql_string_list(values) -%}
  {%- for v in values -%}'{{ v | replace("'", "''") }}'{{ ", " if not loop.last }}{%- endfor -%}
{%- endmacro %}

{#- The reconciliation's horizon: windows starting on or after this (epoch ms SQL expression),
    midnight UTC `reconcile_days` days ago; none (the default) reconciles all history. A cut at a
    window boundary changes nothing for the windows after it: every quote that decides their
    lateness is at or after their start. -#}
{% macro reconcile_cutoff_ms() -%}
  {%- set days = var('reconcile_days', none) -%}
  {%- if days is none or days == '' -%}{{ return(none) }}{%- endif -%}
  {{- return('(cast(floor(' ~ epoch_ms(dbt.current_timestamp()) ~ ' / 86400000) as ' ~ dbt.type_bigint() ~ ') - ' ~ (days | int) ~ ') * 86400000') -}}
{%- endmacro %}
