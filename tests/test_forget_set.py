"""GA+GD and NPO on a tiny model: the loss formula, what training does, divergence, missing data."""

from __future__ import annotations

import math

import pytest
import torch

from memkfac.errors import MemkfacError
from memkfac.forget_set import ForgetSetArguments, npo_loss, suffix_logprobs, train_forget_set, unlearn
from memkfac.methods import EditInputs, apply_edit
from memkfac.models import load_model
from memkfac.probes import Probe


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    forget = [
        (torch.randint(1, 300, (6,), generator=g).tolist(), torch.randint(1, 300, (5,), generator=g).tolist())
        for _ in range(6)
    ]
    retain = torch.randint(1, 300, (8, 24), generator=g).tolist()
    return forget, retain


def test_npo_loss_matches_a_hand_computed_case():
    # log ratios -1 and 2 at beta 0.5: (2 / 0.5) * mean(log(1 + e^{-0.5}), log(1 + e^{1}))
    logp, ref = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -3.0])
    expected = 4.0 * (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert npo_loss(logp, ref, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert npo_loss(ref, ref, 0.5).item() == pytest.approx(
        4.0 * math.log(2.0), rel=1e-6
    )  # = 2 log 2 * 2/beta


@pytest.mark.parametrize("method", ["ga_gd", "npo"])
def test_unlearning_lowers_forget_likelihood_and_keeps_retain_bounded(tiny_model_dir, method):
    model, tok = load_model(tiny_model_dir)
    forget, retain = _data()
    before = suffix_logprobs(model, forget, tok.pad_token_id)
    untouched = model.model.layers[0].mlp.up_proj.weight.clone()
    args = ForgetSetArguments(layers=[1, 2], method=method, steps=20, lr=3e-3)
    result = unlearn(model, forget, retain, args, tok.pad_token_id)
    after = suffix_logprobs(model, forget, tok.pad_token_id)
    assert result.steps == 20 and result.diverged_at is None
    assert after.mean() < before.mean() - 1.0  # the forget suffixes became less likely
    first, last = result.history[0]["retain_ce"], result.history[-1]["retain_ce"]
    assert last < first + 1.0  # the retain loss stays bounded
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, untouched)  # only the edited layers train


def test_a_longer_run_passes_through_the_shorter_one(tiny_model_dir):
    """The model after N steps of a long run is the N-step run's (what compare's step grid relies on)."""
    forget, retain = _data()
    args = ForgetSetArguments(layers=[2], method="npo", steps=6, lr=1e-3)
    long_model, tok = load_model(tiny_model_dir)
    seen = {}
    unlearn(
        long_model,
        forget,
        retain,
        args,
        tok.pad_token_id,
        after_step=lambda n: seen.setdefault(n, long_model.model.layers[2].mlp.gate_proj.weight.clone()),
    )
    short_model, _ = load_model(tiny_model_dir)
    unlearn(
        short_model,
        forget,
        retain,
        ForgetSetArguments(layers=[2], method="npo", steps=3, lr=1e-3),
        tok.pad_token_id,
    )
    assert torch.equal(seen[3], short_model.model.layers[2].mlp.gate_proj.weight)


def test_divergence_is_reported_with_its_step(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    forget, retain = _data()
    retain_nan = [[1, 2, 3]] * 4

    def poison(n):  # a NaN weight after step 2 makes step 3's loss NaN
        if n == 2:
            model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")

    result = unlearn(
        model,
        forget,
        retain_nan,
        ForgetSetArguments(layers=[2], steps=5),
        tok.pad_token_id,
        after_step=poison,
    )
    assert result.diverged_at == 3 and result.steps == 2


def test_train_forget_set_writes_a_checkpoint_and_refuses_missing_data(tiny_model_dir, tmp_path):
    forget, retain = _data()
    args = ForgetSetArguments(layers="2-3", method="ga_gd", steps=2)
    manifest = train_forget_set(tiny_model_dir, forget, retain, args, tmp_path / "ga", progress=False)
    assert manifest["arguments"]["layers"] == [2, 3] and len(manifest["history"]) == 2
    with pytest.raises(MemkfacError, match="trains on a forget set"):
        train_forget_set(tiny_model_dir, [], retain, args, tmp_path / "none", progress=False)


def test_a_forget_set_method_without_a_forget_set_is_a_clear_error(tiny_model_dir, tmp_path):
    only_controls = [Probe("c", "cue:", " secret", kind="control", split="holdout")]
    inputs = EditInputs(
        model_dir=tiny_model_dir, probes=only_controls, retain=torch.ones(2, 8, dtype=torch.long)
    )
    with pytest.raises(MemkfacError, match="trains on a forget set"):
        apply_edit(ForgetSetArguments(layers=[1], method="npo"), inputs, tmp_path / "npo")
    assert not (tmp_path / "npo").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ascent"}, "method is"),
        ({"steps": 0}, "steps"),
        ({"beta": 0.0}, "beta"),
        ({"lr": -1}, "lr"),
    ],
)
def test_forget_set_arguments_are_checked(kwargs, message):
    with pytest.raises(MemkfacError, match=message):
        ForgetSetArguments(layers=[1], **kwargs)
