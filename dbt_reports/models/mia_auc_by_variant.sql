-- Membership-inference AUC (memorized vs control probes) of every variant on every probe set, per
-- score, next to its unedited model's AUC. auc_drop = base_auc - auc: how much membership signal the
-- edit removed (an AUC of 0.5 no longer tells trained from never-seen probes). tpr_at_1pct_fpr: the
-- share of memorized probes flagged while at most 1% of controls are (with under 100 controls: none).
-- A variant or probe set with no AUC rows is simply absent; where the unedited model has none, the
-- base_ columns and auc_drop are null.
with a as (
    {{ with_model_and_edit(source('evals', 'mia_auc')) }}
)
select
    a.model,
    a.edit,
    a.variant,
    a.probe_set,
    a.score,
    a.member_kind,
    a.nonmember_kind,
    a.n_members,
    a.n_nonmembers,
    a.auc,
    a.tpr_at_1pct_fpr,
    b.auc as base_auc,
    b.tpr_at_1pct_fpr as base_tpr_at_1pct_fpr,
    b.auc - a.auc as auc_drop
from a
left join a as b
    on b.model = a.model and b.edit = 'base' and b.probe_set = a.probe_set and b.score = a.score
    and b.member_kind = a.member_kind and b.nonmember_kind = a.nonmember_kind
