"""memkfac.resurgence (the attack suite the resurgence asset runs) on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memkfac.canaries import CanaryArguments, generate_canaries
from memkfac.errors import MemkfacError
from memkfac.resurgence import (
    ARMS,
    ResurgenceArguments,
    attack_rows,
    general_pools,
    general_sequences,
    n_step_plan,
    split_canaries,
)

# 8 blocks of 16 tokens; the unrelated arm (3 x 8 tokens) takes the last 2, retain the other 6
SMALL = dict(steps=(1, 2), batch_size=2, general_len=8, unrelated_count=3, unrelated_len=8, eval_batch_size=8)


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


def test_attack_rows_cover_every_arm_step_and_kind(tiny_model_dir):
    trained, control = generate_canaries(CanaryArguments(n_trained=4, n_control=2))
    blocks = torch.randint(0, 300, (8, 16))
    args = ResurgenceArguments(**SMALL, seed=7)
    assert args.arms == ARMS == ("retain", "relearn", "unrelated")
    rows = attack_rows(tiny_model_dir, tiny_model_dir, trained + control, blocks, args, progress=False)
    keys = {(r["arm"], r["steps"], r["kind"]) for r in rows}
    assert keys == {(a, n, k) for a in ARMS for n in (0, 1, 2) for k in ("memorized", "control")}
    assert len(rows) == len(keys)
    for r in rows:
        assert 0 <= r["strict_pct"] <= 100 and r["seed"] == 7
        # an unedited random model recites nothing: recovered is undefined, not a division by zero
        assert r["strict_pct_before_edit"] == 0 and r["recovered"] is None
    # one arm, as `memkfac compare` calls it; relearning alone reads no general text
    no_text = torch.zeros(0, 16, dtype=torch.long)
    only = attack_rows(
        tiny_model_dir,
        tiny_model_dir,
        trained + control,
        no_text,
        ResurgenceArguments(**SMALL, arms=("relearn",)),
    )
    assert {r["arm"] for r in only} == {"relearn"} and len(only) == 3 * 2
    with pytest.raises(MemkfacError, match="holds 0 blocks"):
        attack_rows(
            tiny_model_dir,
            tiny_model_dir,
            trained + control,
            no_text,
            ResurgenceArguments(**SMALL, arms=("unrelated",)),
        )


def test_recovered_is_recall_after_n_over_the_unedited_models_before_fine_tuning(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The unedited model recites all held-back canaries, the model under test one of two at every
    step: recovered is 0.5 for each arm and step; controls, recited by neither, have none."""
    import shutil

    import memkfac.resurgence
    from memkfac.memorization import memorization_rows

    reference = tmp_path / "unedited"
    shutil.copytree(tiny_model_dir, reference)
    trained, control = generate_canaries(CanaryArguments(n_trained=4, n_control=2))

    def recall(model, tokenizer, probes, *args, **kwargs):
        rows = memorization_rows(model, tokenizer, probes, *args, **kwargs)
        recites = Path(model.config._name_or_path) == reference
        held_back = [r for r in rows if r["kind"] == "memorized"]
        for i, r in enumerate(held_back):
            r["strict"] = recites or i == 0
        return rows

    monkeypatch.setattr(memkfac.resurgence, "memorization_rows", recall)
    blocks = torch.randint(0, 300, (8, 16))
    rows = attack_rows(tiny_model_dir, reference, trained + control, blocks, ResurgenceArguments(**SMALL))
    memorized = [r for r in rows if r["kind"] == "memorized"]
    assert len(memorized) == len(ARMS) * 3
    assert all(
        (r["strict_pct"], r["strict_pct_before_edit"], r["recovered"]) == (50, 100, 0.5) for r in memorized
    )
    assert all(r["recovered"] is None for r in rows if r["kind"] == "control")


def test_unrelated_arm_is_a_fixed_set_disjoint_from_the_retain_data():
    blocks = torch.arange(8 * 16).reshape(8, 16)
    args = ResurgenceArguments(general_len=8, unrelated_count=3, unrelated_len=8)
    retain, unrelated = general_pools(blocks, args)
    assert unrelated.shape == (3, 8) and retain.shape == (12, 8)
    # the unrelated set comes from the last blocks (2 hold 3 sequences), retain from all the others
    assert unrelated.tolist() == blocks[6:].reshape(-1, 8)[:3].tolist()
    assert retain.tolist() == blocks[:6].reshape(-1, 8).tolist()
    assert not set(unrelated.flatten().tolist()) & set(retain.flatten().tolist())
    # the same whichever arms run and whatever the seed
    again = general_pools(blocks, ResurgenceArguments(**{**SMALL, "arms": ("unrelated",), "seed": 5}))
    assert torch.equal(again[1], unrelated)
    # the default: ten 16-token sequences, from the last two 128-token blocks (8 a block)
    default_retain, default_unrelated = general_pools(
        torch.arange(4 * 128).reshape(4, 128), ResurgenceArguments()
    )
    assert default_unrelated.shape == (10, 16) and default_retain.shape == (2 * 128 // 64, 64)


def test_unrelated_arm_needs_blocks_to_spare():
    args = ResurgenceArguments(general_len=8, unrelated_count=4, unrelated_len=8)
    with pytest.raises(MemkfacError, match="holds 2 blocks; the unrelated arm takes the last 2"):
        general_pools(torch.zeros(2, 16, dtype=torch.long), args)
    with pytest.raises(
        MemkfacError, match=r"unrelated_len 32 is longer than the corpus blocks \(16 tokens\)"
    ):
        general_pools(torch.zeros(8, 16, dtype=torch.long), ResurgenceArguments(unrelated_len=32))


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
    args = ResurgenceArguments(steps=(1,), general_len=32, unrelated_count=2, unrelated_len=8)
    with pytest.raises(MemkfacError, match=r"general_len 32 is longer than the corpus blocks \(16 tokens\)"):
        attack_rows(tiny_model_dir, tiny_model_dir, trained + control, blocks, args, progress=False)


def test_general_sequences_cut_blocks_in_order_and_drop_the_remainder():
    blocks = torch.arange(20).reshape(2, 10)
    pieces = [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17]]
    assert general_sequences(blocks, 4).tolist() == pieces
    assert general_sequences(blocks, 10).tolist() == blocks.tolist()
