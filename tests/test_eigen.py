"""Eigenbasis of merged factors: reconstruction, ordering, clamping, sharing, and clean failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from memkfac.eigen import compute_eigenbasis, load_eigenbasis, symmetric_eigh
from memkfac.errors import MemkfacError
from memkfac.factor_store import load_factors
from memkfac.factors import FactorArguments, collect_factors
from memkfac.fingerprint import sha256_file
from memkfac.tiny import build_tiny_model


@pytest.fixture(scope="module")
def factor_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eig") / "factors"
    model, _ = build_tiny_model(arch="qwen2", seed=0)
    blocks = torch.randint(0, 384, (8, 16), generator=torch.Generator().manual_seed(0))
    args = FactorArguments(layers=[2, 3], batch_size=4)
    collect_factors(model, blocks, out, args, model_fingerprint="m", corpus_fingerprint="c", progress=False)
    return out


def test_eigenbasis_reconstructs_the_factors(factor_dir, tmp_path):
    eig_dir = compute_eigenbasis(factor_dir, tmp_path / "eig", progress=False)
    modules, meta = load_eigenbasis(eig_dir)
    factors = load_factors(factor_dir)
    assert modules.keys() == factors.keys()
    for name, e in modules.items():
        for values, vectors, matrix in ((e.lam, e.U_G, factors[name].G), (e.mu, e.U_A, factors[name].A)):
            assert values.dtype == vectors.dtype == torch.float32
            assert (values >= 0).all() and (values[:-1] >= values[1:]).all()
            eye = torch.eye(len(values))
            torch.testing.assert_close(vectors.T @ vectors, eye, atol=1e-5, rtol=0)
            rebuilt = vectors @ torch.diag(values) @ vectors.T
            assert (rebuilt - matrix).abs().max() < 1e-5 * matrix.abs().max()
    gate, up = modules["model.layers.2.mlp.gate_proj"], modules["model.layers.2.mlp.up_proj"]
    assert gate.U_A is up.U_A  # one decomposition of the shared A
    assert (
        len(load_file(str(eig_dir / "eigenbasis.safetensors"))) == 2 * (2 + 3) * 2
    )  # layers x (A groups + G) x (values, vectors)
    assert meta["model_fingerprint"] == "m" and meta["tokens"] == 8 * 15
    assert meta["factor_index_sha256"] == sha256_file(factor_dir / "index.json")
    assert [t["name"] for t in meta["targets"]] == list(factors)


def test_tiny_negative_eigenvalues_are_clamped_and_sorted_descending():
    v = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    m = v @ torch.diag(torch.tensor([3.0, 1.0, 0.0, -1e-9, 2.0], dtype=torch.float64)) @ v.T
    values, vectors = symmetric_eigh(m + 1e-12 * torch.randn(5, 5, dtype=torch.float64), "test")
    torch.testing.assert_close(values, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert values[-1] == 0 and values[-2] == 0


def test_clearly_indefinite_factor_is_refused():
    with pytest.raises(MemkfacError, match="not positive semi-definite"):
        symmetric_eigh(torch.diag(torch.tensor([1.0, -0.5])), "G of x")


def test_non_finite_factor_names_the_module():
    m = torch.eye(3)
    m[1, 2] = float("inf")
    with pytest.raises(MemkfacError, match=r"factor A of model\.layers\.4\.mlp\.gate_up_proj contains NaN"):
        symmetric_eigh(m, "A of model.layers.4.mlp.gate_up_proj")


def test_failed_eigenbasis_writes_nothing(factor_dir, tmp_path):
    index = json.loads((factor_dir / "index.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for s in index["shards"]:
        (broken / s["file"]).write_bytes((factor_dir / s["file"]).read_bytes())
    index["shards"][0]["sha256"] = "0" * 64
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(MemkfacError, match="does not match its sha256"):
        compute_eigenbasis(broken, tmp_path / "eig", progress=False)
    assert not (tmp_path / "eig").exists()
    with pytest.raises(MemkfacError, match="not an eigenbasis directory"):
        load_eigenbasis(tmp_path / "eig")
