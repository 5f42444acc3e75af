-- Downstream task retention of every edit (score / unedited score, paired-bootstrap 95% interval),
-- with the mean over tasks per variant.
with d as (
    {{ with_model_and_edit(source('evals', 'downstream')) }}
    where retention is not null
)
select
    model,
    edit,
    variant,
    task,
    category,
    score,
    base_score,
    retention,
    retention_ci_low,
    retention_ci_high,
    avg(retention) over (partition by variant) as mean_retention
from d
