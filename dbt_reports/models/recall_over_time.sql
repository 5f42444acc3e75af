-- Recall of registered fine-tunes over time, per lineage (the edit each fine-tune descends from),
-- from the watch's append-only history (memkfac.watch, one Parquet file per evaluation). Rows whose
-- status is not 'ok' are versions the watch could not evaluate; they stay visible with their reason.
-- Without any evaluation yet the model is empty (read_parquet refuses a glob that matches nothing).
{% set pattern = env_var('MEMKFAC_HOME') ~ '/evals/watch_history/*/*/*.parquet' %}
{% set found = execute and (run_query("select count(*) from glob('" ~ pattern ~ "')").columns[0].values()[0] > 0) %}
with history as (
{% if found %}
    select * from read_parquet('{{ pattern }}', hive_partitioning = false)
{% else %}
    select
        null::varchar as registered_model, null::varchar as version,
        null::timestamptz as evaluated_at, null::varchar as status, null::varchar as message,
        null::varchar as parent, null::varchar as lineage, null::varchar as variant,
        null::varchar as probe_set, null::bigint as removed_n, null::bigint as removed_strict_k,
        null::double as removed_strict_pct, null::double as removed_loose_pct, null::bigint as control_n,
        null::double as control_strict_pct, null::double as control_loose_pct, null::double as perplexity,
        null::double as mia_auc, null::double as max_recall_pct, null::boolean as alert
    where false
{% endif %}
)
select
    lineage,
    variant,
    registered_model,
    version,
    registered_model || '/' || version as registered_version,
    parent,
    evaluated_at,
    status,
    message,
    probe_set,
    removed_n,
    removed_strict_k,
    removed_strict_pct,
    removed_loose_pct,
    control_strict_pct,
    control_loose_pct,
    perplexity,
    mia_auc,
    max_recall_pct,
    alert,
    -- the n-th evaluation of this lineage, and the change since the lineage's previous evaluated row
    row_number() over (partition by lineage order by evaluated_at) as evaluation_in_lineage,
    removed_strict_pct - lag(removed_strict_pct) over (
        partition by lineage, status order by evaluated_at
    ) as removed_strict_pct_change
from history
