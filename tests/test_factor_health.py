"""The factor check: collected factors pass; asymmetric, indefinite or miscounted ones are named."""

from __future__ import annotations

import pytest
import torch

from memkfac import factor_store
from memkfac.factor_health import check_factors
from memkfac.factor_store import ModuleFactors, load_factors
from memkfac.factors import FactorArguments, collect_factors
from memkfac.tiny import build_tiny_model


@pytest.fixture(scope="module")
def factor_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("health") / "factors"
    model, _ = build_tiny_model(arch="llama", seed=0)
    blocks = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(0))
    args = FactorArguments(layers="2-3", projections=("gate", "up"), batch_size=2)
    collect_factors(model, blocks, out, args, model_fingerprint="m", corpus_fingerprint="c", progress=False)
    return out


def test_collected_factors_pass(factor_dir):
    found = check_factors(factor_dir)
    assert found["problems"] == [] and found["finite"] and found["modules"] == 4
    assert found["tokens_per_module"] == [found["index_tokens"]] == [4 * 15]


def test_broken_factors_are_named(factor_dir, monkeypatch):
    good = load_factors(factor_dir)
    name = next(iter(good))
    A = good[name].A.clone()
    A[0, 1] += A.abs().max()  # asymmetric
    broken = dict(good) | {name: ModuleFactors(A, -good[name].G, good[name].tokens + 1)}  # indefinite G
    monkeypatch.setattr(factor_store, "load_factors", lambda _: broken)
    problems = check_factors(factor_dir)["problems"]
    assert [p.split()[0] for p in problems] == ["asymmetry", "negative", "token"], problems
