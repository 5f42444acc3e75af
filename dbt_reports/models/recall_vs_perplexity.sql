-- The trade-off per rho: recall on memorized probes of the holdout split against the perplexity increase.
select
    f.model,
    f.edit,
    f.variant,
    f.probe_set,
    f.split,
    f.strict_pct,
    f.loose_pct,
    f.base_strict_pct,
    u.perplexity,
    u.perplexity_increase,
    u.ndcg
from {{ ref('forgetting_by_variant') }} as f
join {{ ref('utility_retention') }} as u on u.variant = f.variant
where f.kind = 'memorized' and f.split in ('holdout', 'all')
  -- 'all' only for a probe set without a holdout split
  and not (f.split = 'all' and exists (
      select 1 from {{ ref('forgetting_by_variant') }} as g
      where g.variant = f.variant and g.probe_set = f.probe_set and g.kind = f.kind and g.split = 'holdout'))
