"""memkfac.resurgence (the protocol the resurgence asset runs) on a tiny model."""

from __future__ import annotations

import pytest
import torch

from memkfac.canaries import CanaryArguments, generate_canaries
from memkfac.errors import MemkfacError
from memkfac.resurgence import (
    ResurgenceArguments,
    general_sequences,
    n_step_plan,
    resurgence_rows,
    split_canaries,
)


def test_n_step_plan_has_exactly_n_batches():
    pool = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11]]
    plan = n_step_plan(pool, 7, batch_size=2, pad_id=0, seed=0)
    batches = plan(0)
    assert len(batches) == 7
    assert all(b["input_ids"].shape[0] <= 2 for b in batches)


def test_split_canaries_relearns_sweep_and_measures_the_rest():
    trained, control = generate_canaries(CanaryArguments(n_trained=8, n_control=6))
    relearn, measured = split_canaries(trained + control)
    assert {p.split for p in relearn} == {"sweep"} and len(relearn) == 4
    assert {(p.kind, p.split) for p in measured if p.kind == "memorized"} == {("memorized", "holdout")}
    # as many controls as held-back canaries, the first ones
    assert [p for p in measured if p.kind == "control"] == control[:4]
    with pytest.raises(MemkfacError, match="sweep and the holdout"):
        split_canaries(control)


def test_resurgence_rows_cover_every_recipe_step_and_kind(tiny_model_dir):
    trained, control = generate_canaries(CanaryArguments(n_trained=4, n_control=2))
    blocks = torch.randint(0, 300, (8, 16))
    args = ResurgenceArguments(steps=(1, 2), batch_size=2, general_len=8, eval_batch_size=8)
    rows = resurgence_rows(tiny_model_dir, tiny_model_dir, trained + control, blocks, args, progress=False)
    keys = {(r["recipe"], r["steps"], r["kind"]) for r in rows}
    assert keys == {(rc, n, k) for rc in args.recipes for n in (0, 1, 2) for k in ("memorized", "control")}
    for r in rows:
        assert 0 <= r["strict_pct"] <= 100
        # an unedited random model recites nothing: R(N) is undefined, not a division by zero
        assert r["strict_pct_before_edit"] == 0 and r["resurgence"] is None


def test_checkpoint_of_one_run_is_the_fresh_n_step_run(tiny_model_dir):
    """Resurgence measures N = 10, 50, 200 on one run: its checkpoint at N must equal an N-step run."""
    from memkfac.finetune import FinetuneArguments, finetune
    from memkfac.models import load_model

    pool = torch.randint(0, 300, (12, 16)).tolist()
    config = FinetuneArguments(epochs=1, lr=1e-3, warmup_steps=2, decay="constant", seed=0)
    long_run, _ = load_model(tiny_model_dir)
    at_three = {}

    def keep(n: int) -> None:
        if n == 3:
            at_three.update({k: v.clone() for k, v in long_run.state_dict().items()})

    finetune(long_run, n_step_plan(pool, 7, 2, 0, seed=0), config, progress=False, after_step=keep)
    fresh, _ = load_model(tiny_model_dir)
    finetune(fresh, n_step_plan(pool, 3, 2, 0, seed=0), config, progress=False)
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(at_three[name], value, rtol=0, atol=0, msg=name)
    # and the long run went on from there
    assert not torch.equal(long_run.state_dict()["lm_head.weight"], at_three["lm_head.weight"])


def test_general_text_longer_than_a_block_is_refused(tiny_model_dir):
    trained, control = generate_canaries(CanaryArguments(n_trained=4, n_control=2))
    blocks = torch.randint(0, 300, (8, 16))
    args = ResurgenceArguments(steps=(1,), general_len=32)
    with pytest.raises(MemkfacError, match=r"general_len 32 is longer than the corpus blocks \(16 tokens\)"):
        resurgence_rows(tiny_model_dir, tiny_model_dir, trained + control, blocks, args, progress=False)


def test_general_sequences_cut_blocks_in_order_and_drop_the_remainder():
    blocks = torch.arange(20).reshape(2, 10)
    pieces = [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17]]
    assert general_sequences(blocks, 4).tolist() == pieces
    assert general_sequences(blocks, 10).tolist() == blocks.tolist()
