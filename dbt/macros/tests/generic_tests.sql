{#- The project's own generic tests (`dbt deps` cannot reach the package hub from where this is
    built, so nothing comes from dbt-utils). Each selects the offending rows: none = pass. -#}

{#- No two rows share these columns' values. -#}
{% test unique_combination(model, columns) %}
select {{ columns | join(', ') }}, count(*) as occurrences
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}

{#- Every row satisfies a SQL condition (e.g. `high >= low`); null counts as a failure unless
    the condition says otherwise. -#}
{% test expression_is_true(model, expression) %}
select *
from {{ model }}
where not coalesce({{ expression }}, false)
{% endtest %}

{#- The column lies in [min_value, max_value] (either bound optional; `min_exclusive` makes the
    lower bound strict); nulls are not checked (not_null does that). -#}
{% test in_range(model, column_name, min_value=none, max_value=none, min_exclusive=false) %}
select *
from {{ model }}
where {{ column_name }} is not null
  and (
    false
    {%- if min_value is not none %}
    or {{ column_name }} {{ '<=' if min_exclusive else '<' }} {{ min_value }}
    {%- endif %}
    {%- if max_value is not none %}
    or {{ column_name }} > {{ max_value }}
    {%- endif %}
  )
{% endtest %}

{#- The column's values are among the `accepted_symbols` setting (DBT_ACCEPTED_SYMBOLS, or
    `--vars '{accepted_symbols: [...]}'`). With the setting empty every symbol is accepted: the
    contract already bounds them, and a deployment lists its own. -#}
{% test accepted_symbols(model, column_name) %}
{%- set symbols = stockstream_list_setting('accepted_symbols', '') -%}
select {{ column_name }}, count(*) as occurrences
from {{ model }}
{%- if symbols %}
where {{ column_name }} not in ({{ sql_string_list(symbols) }})
{%- else %}
where false
{%- endif %}
group by {{ column_name }}
{% endtest %}

{#- Reconciliation (windows since the `reconcile_days` horizon, when set): `model` and
    `compare_model` hold the same keys, and for each key the same
    `exact` columns and, within a relative `tolerance`, the same `approx` columns (float sums
    depend on the order of addition). Reports each missing, extra or differing key once. -#}
{% test matches_recomputed_windows(model, compare_model, keys, exact, approx, tolerance=1e-9) %}
{%- set join_on -%}
  {%- for k in keys %}{{ ' and ' if not loop.first }}m.{{ k }} = c.{{ k }}{%- endfor -%}
{%- endset %}
select
    {%- for k in keys %}
    coalesce(m.{{ k }}, c.{{ k }}) as {{ k }},
    {%- endfor %}
    case
        when c.{{ keys[0] }} is null then 'not in the recomputation'
        when m.{{ keys[0] }} is null then 'only in the recomputation'
        else 'different'
    end as problem
{%- set cutoff = reconcile_cutoff_ms() %}
from (
    select * from {{ model }}
    {%- if cutoff is not none %} where window_start_ms >= {{ cutoff }}{% endif %}
) as m
full outer join (
    select * from {{ compare_model }}
    {%- if cutoff is not none %} where window_start_ms >= {{ cutoff }}{% endif %}
) as c on {{ join_on }}
where m.{{ keys[0] }} is null
   or c.{{ keys[0] }} is null
   {%- for col in exact %}
   or not coalesce(m.{{ col }} = c.{{ col }} or (m.{{ col }} is null and c.{{ col }} is null), false)
   {%- endfor %}
   {%- for col in approx %}
   or not coalesce(
        abs(m.{{ col }} - c.{{ col }}) <= {{ tolerance }} * greatest(abs(m.{{ col }}), abs(c.{{ col }}), 1)
        or (m.{{ col }} is null and c.{{ col }} is null),
        false
   )
   {%- endfor %}
{% endtest %}
