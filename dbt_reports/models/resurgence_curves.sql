-- Resurgence after N fine-tuning steps. Two forms:
--   resurgence          = recall_e(N) / recall before the edit (the base model's, no fine-tuning)
--   removed_fraction_back = (recall_e(N) - recall_e(0)) / (recall_0(0) - recall_e(0)),
--                          the fraction of the removed recall that came back;
--                          null when the edit removed nothing.
with r as (
    {{ with_model_and_edit(source('evals', 'resurgence')) }}
),
start as (
    select variant, recipe, kind, strict_pct as strict_pct_at_0 from r where steps = 0
)
select
    r.model,
    r.edit,
    r.variant,
    r.recipe,
    r.kind,
    r.steps,
    r.n_probes,
    r.strict_pct,
    r.loose_pct,
    r.strict_pct_before_edit,
    r.resurgence,
    s.strict_pct_at_0,
    case when r.strict_pct_before_edit - s.strict_pct_at_0 > 0
        then (r.strict_pct - s.strict_pct_at_0) / (r.strict_pct_before_edit - s.strict_pct_at_0)
    end as removed_fraction_back
from r
join start as s on s.variant = r.variant and s.recipe = r.recipe and s.kind = r.kind
