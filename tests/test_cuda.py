"""The engine on a CUDA device agrees with the CPU reference: factors (fp64 and bf16 models), the
eigenbasis, edits, greedy generation and perplexity.

These need a GPU and are skipped (with that reason, shown by ``-ra``) elsewhere; CI has none. They
were run on a lent H100 with ``python -m pytest tests/test_cuda.py`` (see docs/results.md "On a GPU").
``MEMKFAC_TEST_DEVICE`` picks another device (``mps``; ``cpu`` checks the tests themselves).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_factors import IDS, assert_rel_close, brute_force, check_bfloat16_accumulates_in_float32

from memkfac.editing import EditArguments, edit_model
from memkfac.eigen import compute_eigenbasis, load_eigenbasis
from memkfac.factor_store import load_factors
from memkfac.factors import FactorArguments, collect_factors
from memkfac.fingerprint import model_fingerprint
from memkfac.generation import greedy_continuations
from memkfac.models import load_model
from memkfac.targets import find_targets
from memkfac.tiny import build_tiny_model
from memkfac.utility import perplexity

DEVICE = torch.device(os.environ.get("MEMKFAC_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(1, 384, (6, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_factors_on_cuda_match_the_per_token_reference(tmp_path, blocks, fisher):
    model, _ = build_tiny_model(arch="llama", seed=1, dtype=torch.float64, num_layers=3)
    model.to(DEVICE)
    args = FactorArguments(layers=[1, 2], fisher=fisher, seed=3, batch_size=4, model_dtype="float64")
    collect_factors(model, blocks, tmp_path / "f", args, progress=False, **IDS)
    factors = load_factors(tmp_path / "f")
    # sampled labels come from a generator on the logits' device: the reference runs there too
    A, G, tokens = brute_force(model, blocks.to(DEVICE), [16] * 6, find_targets(model, [1, 2]), fisher, 3)
    for name, f in factors.items():
        assert f.tokens == tokens
        assert_rel_close(f.A, A[name].cpu(), 1e-10)
        assert_rel_close(f.G, G[name].cpu(), 1e-10)


def test_activation_factors_on_cuda_equal_the_cpu_ones(tmp_path, blocks):
    """A does not depend on the sampled labels, so CPU and CUDA collections must agree on it.

    Only to ~1e-8, not fp64 round-off: transformers computes the rotary cos/sin in float32 even for an
    fp64 model, and CPU and CUDA float32 sin/cos differ in the last bits (measured on an H100: 4.5e-8).
    """
    model, _ = build_tiny_model(arch="llama", seed=1, dtype=torch.float64, num_layers=3)
    args = FactorArguments(layers=[1, 2], seed=3, batch_size=4, model_dtype="float64")
    collect_factors(model, blocks, tmp_path / "cpu", args, progress=False, **IDS)
    collect_factors(model.to(DEVICE), blocks, tmp_path / "cuda", args, progress=False, **IDS)
    cpu, cuda = load_factors(tmp_path / "cpu"), load_factors(tmp_path / "cuda")
    for name in cpu:
        assert_rel_close(cuda[name].A, cpu[name].A, 1e-6)


def test_bfloat16_model_on_cuda_accumulates_in_float32(tmp_path, blocks):
    """On CUDA the bf16 products run on tensor cores with an fp32 result (``torch.mm(out_dtype=)``)."""
    model, _ = build_tiny_model(arch="llama", seed=0, hidden_size=64, intermediate_size=128)
    check_bfloat16_accumulates_in_float32(model.to(DEVICE), blocks, tmp_path)


def test_eigenbasis_and_edit_on_cuda_equal_the_cpu_ones(tmp_path, tiny_model_dir, blocks):
    model, _ = load_model(tiny_model_dir)
    ids = IDS | {"model_fingerprint": model_fingerprint(tiny_model_dir)}
    collect_factors(model, blocks, tmp_path / "f", FactorArguments(layers=[1, 2]), progress=False, **ids)
    cpu_eig = compute_eigenbasis(tmp_path / "f", tmp_path / "eig-cpu", progress=False)
    cuda_eig = compute_eigenbasis(tmp_path / "f", tmp_path / "eig-cuda", progress=False, device=DEVICE)
    cpu_modules, _ = load_eigenbasis(cpu_eig)
    cuda_modules, _ = load_eigenbasis(cuda_eig)
    for name, ref in cpu_modules.items():
        got = cuda_modules[name]
        assert got.U_G.device.type == "cpu"  # written and loaded on the CPU whatever the eigh device
        assert_rel_close(got.lam, ref.lam, 1e-5)
        assert_rel_close(got.mu, ref.mu, 1e-5)
        # eigenvectors are defined up to sign (and rotation within ties): compare the factor they rebuild
        assert_rel_close(
            got.U_G @ torch.diag(got.lam) @ got.U_G.T, ref.U_G @ torch.diag(ref.lam) @ ref.U_G.T, 1e-4
        )

    for method in ("kfac", "svd", "random"):
        config = EditArguments(layers=[1, 2], keep_mass=0.8, method=method)
        on_cpu = edit_model(tiny_model_dir, cpu_eig, config, tmp_path / f"{method}-cpu", progress=False)
        on_gpu = edit_model(
            tiny_model_dir, cpu_eig, config, tmp_path / f"{method}-cuda", progress=False, device=DEVICE
        )
        assert [m["n_kept"] for m in on_gpu["modules"]] == [m["n_kept"] for m in on_cpu["modules"]]
        a, _ = load_model(tmp_path / f"{method}-cpu")
        b, _ = load_model(tmp_path / f"{method}-cuda")
        for t in find_targets(a, [1, 2]):
            wa, wb = a.get_submodule(t.name).weight, b.get_submodule(t.name).weight
            assert torch.allclose(wa, wb, atol=1e-6), f"{method} {t.name}"


def test_greedy_generation_and_perplexity_on_cuda_match_the_cpu(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, dtype="float32")
    model.double()  # fp64 on both devices: no argmax flips from rounding
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 384, (n,), generator=gen).tolist() for n in (3, 9, 5, 12, 7)]
    on_cpu = greedy_continuations(model, tokenizer, prompts, 10, batch_size=8, progress=False)
    model.to(DEVICE)
    batched = greedy_continuations(model, tokenizer, prompts, 10, batch_size=8, progress=False)
    one_by_one = greedy_continuations(model, tokenizer, prompts, 10, batch_size=1, progress=False)
    assert batched == one_by_one == on_cpu

    text = torch.randint(1, 384, (4, 32), generator=gen)
    ppl_cuda = perplexity(model, text, progress=False)["perplexity"]
    ppl_cpu = perplexity(model.cpu(), text, progress=False)["perplexity"]
    assert ppl_cuda == pytest.approx(ppl_cpu, rel=1e-6)
