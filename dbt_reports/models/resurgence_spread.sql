-- The attack suite over its history: mean and spread of `recovered` (strict recall after N steps /
-- the unedited model's before fine-tuning) per model, edit, arm, probe kind and step, across runs
-- (each weekly run draws its own seed). stddev is the sample standard deviation (null for one run);
-- recovered is null where the unedited model recites none of the kind (controls), and so are these.
select
    model,
    edit,
    arm,
    kind,
    steps,
    count(distinct run_id) as n_runs,
    avg(recovered) as recovered_mean,
    stddev_samp(recovered) as recovered_stddev,
    min(recovered) as recovered_min,
    max(recovered) as recovered_max,
    avg(strict_pct) as strict_pct_mean,
    min(evaluated_at) as first_evaluated_at,
    max(evaluated_at) as last_evaluated_at
from {{ ref('resurgence_curves') }}
group by model, edit, arm, kind, steps
