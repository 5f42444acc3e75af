"""An edit reads only the edited maps' tensors from the eigenbasis file (so 7B edits fit in memory)."""

from __future__ import annotations

import safetensors
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import memkfac.eigen
from memkfac.editing import EditArguments, edit_model, edit_weight
from memkfac.eigen import compute_eigenbasis, load_eigenbasis
from memkfac.factors import FactorArguments, collect_factors
from memkfac.fingerprint import model_fingerprint
from memkfac.tiny import build_tiny_model


def test_edit_reads_only_the_edited_maps_eigenvectors(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model, _ = build_tiny_model(model_dir, arch="llama", seed=0)
    blocks = torch.randint(1, 384, (8, 12), generator=torch.Generator().manual_seed(0))
    args = FactorArguments(projections=("gate", "up", "down"), batch_size=4)  # every layer, every map
    collect_factors(
        model,
        blocks,
        tmp_path / "factors",
        args,
        model_fingerprint=model_fingerprint(model_dir),
        corpus_fingerprint="c",
        progress=False,
    )
    eig_dir = compute_eigenbasis(tmp_path / "factors", tmp_path / "eig", progress=False)
    full, _ = load_eigenbasis(eig_dir)
    with safe_open(str(eig_dir / memkfac.eigen.EIGEN_FILE), framework="pt") as f:
        stored = set(f.keys())
    assert len(stored) == 4 * (2 * 2 + 3 * 2)  # per layer: 2 A groups (gate_up, down) + 3 G, 2 tensors each

    read: list[str] = []

    class CountingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", CountingSafeOpen)  # memkfac.paths.open_safetensors opens
    config = EditArguments(layers=[2], projections=("gate", "up"), keep_mass=0.8)
    edit_model(model_dir, eig_dir, config, tmp_path / "edited", progress=False)

    gate, up = "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"
    expected = {f"G.{name}.{t}" for name in (gate, up) for t in ("lam", "U_G")}
    expected |= {f"A.model.layers.2.mlp.gate_up_proj.{t}" for t in ("mu", "U_A")}
    assert sorted(read) == sorted(expected)  # 6 of the 40 tensors, the shared A read once
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    for name in (gate, up):  # the same weights as an edit with the whole eigenbasis in memory
        W_full, _ = edit_weight(model.get_submodule(name).weight.data, full[name], 0.8)
        assert torch.equal(edited.get_submodule(name).weight.data, W_full)
