-- Recall of every variant on every probe set next to its unedited model's recall (per kind and split).
with s as (
    {{ with_model_and_edit(source('evals', 'memorization_summary')) }}
)
select
    s.model,
    s.edit,
    s.variant,
    s.probe_set,
    s.kind,
    s.split,
    s.n_probes,
    s.strict_pct,
    s.loose_pct,
    s.avg_lev,
    b.strict_pct as base_strict_pct,
    b.loose_pct as base_loose_pct,
    b.strict_pct - s.strict_pct as strict_pct_removed
from s
left join s as b
    on b.model = s.model and b.edit = 'base' and b.probe_set = s.probe_set
    and b.kind = s.kind and b.split = s.split
