"""The label-free baselines: identity-basis keep-mass, flattest-block deletion, matched-norm noise."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from memkfac.editing import _project
from memkfac.errors import MemkfacError
from memkfac.label_free import (
    LabelFreeArguments,
    block_deletion_weight,
    flattest,
    identity_basis_weight,
    noise_weight,
    standard_basis_energy,
)
from memkfac.methods import EditInputs, apply_edit
from memkfac.selection import select_components
from tests.test_editing import random_eigen


@pytest.fixture(scope="module")
def weight_and_eigen():
    return torch.randn(24, 16, generator=torch.Generator().manual_seed(7)), random_eigen(24, 16, seed=3)


def test_identity_basis_is_keep_mass_on_the_standard_basis(weight_and_eigen):
    W, eig = weight_and_eigen
    G = eig.U_G.double() @ torch.diag(eig.lam.double()) @ eig.U_G.double().T
    A = eig.U_A.double() @ torch.diag(eig.mu.double()) @ eig.U_A.double().T
    lam, mu = standard_basis_energy(eig)
    assert torch.allclose(lam.double(), torch.diagonal(G), rtol=1e-5)  # the factors' diagonals
    assert torch.allclose(mu.double(), torch.diagonal(A), rtol=1e-5)
    mask = select_components(lam, mu, 0.8).mask
    expected = _project(W, torch.eye(24), mask, torch.eye(16)).float()  # the K-FAC rule with U = I
    got = identity_basis_weight(W, eig, 0.8)
    assert torch.equal(got, expected)
    assert 0 < int((got == 0).sum()) < W.numel()  # some coordinates zeroed, not all


def test_block_deletion_removes_exactly_the_flattest_block(weight_and_eigen):
    W, eig = weight_and_eigen
    W_new = block_deletion_weight(W, eig, 0.25)
    C_old = eig.U_G.double().T @ W.double() @ eig.U_A.double()
    C_new = eig.U_G.double().T @ W_new.double() @ eig.U_A.double()
    rows, cols = flattest(eig.lam, 0.25), flattest(eig.mu, 0.25)
    assert len(rows) == 6 and len(cols) == 4
    assert set(rows.tolist()) == set(torch.argsort(eig.lam)[:6].tolist())  # smallest G eigenvalues
    block = torch.zeros(24, 16, dtype=torch.bool)
    block[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    assert C_new[block].abs().max() < 1e-5  # the (flat, flat) block is gone
    assert torch.allclose(C_new[~block], C_old[~block], atol=1e-5)  # everything else is untouched
    assert torch.equal(block_deletion_weight(W, eig, 0.0), W)


def test_noise_has_the_asked_norm_and_is_seeded(weight_and_eigen):
    W, _ = weight_and_eigen
    W_new = noise_weight(W, 0.1, seed=4)
    assert torch.linalg.norm(W_new - W) / torch.linalg.norm(W) == pytest.approx(0.1, rel=1e-5)
    assert torch.equal(W_new, noise_weight(W, 0.1, seed=4))
    assert not torch.equal(W_new, noise_weight(W, 0.1, seed=5))


def test_noise_overrides_give_each_module_its_norm(tiny_model_dir, tmp_path):
    args = LabelFreeArguments(layers=[1, 2], method="noise", noise_norm=0.02, overrides={"2.up": 0.3})
    manifest = apply_edit(args, EditInputs(model_dir=tiny_model_dir), tmp_path / "noise", progress=False)
    change = {m["name"]: m["rel_change"] for m in manifest["modules"]}
    assert change["model.layers.2.mlp.up_proj"] == pytest.approx(0.3, rel=1e-4)
    assert change["model.layers.1.mlp.gate_proj"] == pytest.approx(0.02, rel=1e-4)
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "noise" / "model.safetensors"))
    assert torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "noise") is not None


def test_curvature_baselines_need_an_eigenbasis(tiny_model_dir, tmp_path):
    with pytest.raises(MemkfacError, match="needs an eigenbasis"):
        apply_edit(LabelFreeArguments(layers=[1]), EditInputs(model_dir=tiny_model_dir), tmp_path / "a")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "blur"}, "method is 'blur'"),
        ({"keep_mass": 0.0}, "outside"),
        ({"block_fraction": 1.5}, "block_fraction"),
        ({"noise_norm": -1.0}, "noise_norm"),
        ({"overrides": {"1.up": -0.1}}, "negative"),
    ],
)
def test_label_free_arguments_are_checked(kwargs, message):
    with pytest.raises(MemkfacError, match=message):
        LabelFreeArguments(layers=[1], **kwargs)


def test_label_free_edits_check_layers_and_weights_as_the_curvature_edit_does(tiny_model_dir, tmp_path):
    inputs = EditInputs(model_dir=tiny_model_dir)
    with pytest.raises(MemkfacError, match=r"layer\(s\) \[40\] are not in"):
        apply_edit(LabelFreeArguments(layers=[40], method="noise"), inputs, tmp_path / "far")
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MemkfacError, match="NaN or Inf"):
        apply_edit(
            LabelFreeArguments(layers=[1], method="noise"), EditInputs(model_dir=damaged), tmp_path / "n"
        )
    assert not (tmp_path / "far").exists() and not (tmp_path / "n").exists()
