-- What each edit kept: held-out perplexity against the unedited model's, and nDCG@10 of next-token lists.
with p as (
    {{ with_model_and_edit(source('evals', 'perplexity')) }}
)
select
    p.model,
    p.edit,
    p.variant,
    p.perplexity,
    b.perplexity as base_perplexity,
    p.perplexity / b.perplexity - 1 as perplexity_increase,
    n.ndcg,
    n.ndcg_official
from p
left join p as b on b.model = p.model and b.edit = 'base'
left join {{ source('evals', 'ndcg') }} as n on n.variant = p.variant
