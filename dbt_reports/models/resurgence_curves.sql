-- The attack suite, every run: recall after N fine-tuning steps per variant, arm and probe kind.
--   recovered             = strict recall after N / the unedited model's strict recall before any
--                           fine-tuning: the fraction of pre-edit recall the attack recovered;
--   removed_fraction_back = (recall_e(N) - recall_e(0)) / (recall_0(0) - recall_e(0)), the fraction of
--                           the recall the edit removed that came back; null when the edit removed none.
-- A run is one file of the resurgence history (run_id, its seed and created_at, the evaluation time).
with r as (
    {{ with_model_and_edit(source('evals', 'resurgence')) }}
),
start as (
    select run_id, variant, arm, kind, strict_pct as strict_pct_at_0 from r where steps = 0
)
select
    r.model,
    r.edit,
    r.variant,
    r.run_id,
    r.seed,
    r.created_at as evaluated_at,
    r.arm,
    r.kind,
    r.steps,
    r.n_probes,
    r.strict_pct,
    r.loose_pct,
    r.strict_pct_before_edit,
    r.recovered,
    s.strict_pct_at_0,
    case when r.strict_pct_before_edit - s.strict_pct_at_0 > 0
        then (r.strict_pct - s.strict_pct_at_0) / (r.strict_pct_before_edit - s.strict_pct_at_0)
    end as removed_fraction_back
from r
join start as s on s.run_id = r.run_id and s.variant = r.variant and s.arm = r.arm and s.kind = r.kind
