-- Recall of every variant on every probe set next to its unedited model's recall (per kind and split):
-- strict/loose/avgLev (the paper's Table 1) and the unlearning field's means in [0, 1], each 1 when
-- fully memorized: verbmem (MUSE VerbMem, ROUGE-L F1), exact_memorization (teacher-forced argmax
-- accuracy) and extraction_strength (1 - k*/L).
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
    s.verbmem,
    s.exact_memorization,
    s.extraction_strength,
    b.strict_pct as base_strict_pct,
    b.loose_pct as base_loose_pct,
    b.verbmem as base_verbmem,
    b.exact_memorization as base_exact_memorization,
    b.extraction_strength as base_extraction_strength,
    b.strict_pct - s.strict_pct as strict_pct_removed
from s
left join s as b
    on b.model = s.model and b.edit = 'base' and b.probe_set = s.probe_set
    and b.kind = s.kind and b.split = s.split
