"""Peer check: our factors against curvlinops' KFACLinearOperator (empirical Fisher, KFAC-expand).

curvlinops (installed with --no-deps: curvlinops-for-pytorch 3.0.1) sees every position of its input,
so it gets each block without its last token (causal attention makes the activations at the other
positions identical) and the next tokens as labels. Its documented scaling, with a sum-reduced loss:
A = sum_x x x^T / (N_data * positions per sequence), our normalised A; G = sum_g g g^T, our G times the
token count.
"""

from __future__ import annotations

import curvlinops
import pytest
import torch
from torch import nn

from memkfac.factor_store import load_factors
from memkfac.factors import FactorArguments, collect_factors
from memkfac.targets import find_targets
from memkfac.tiny import build_tiny_model


class LogitsForCrossEntropy(nn.Module):
    """(batch, seq) ids -> (batch, vocab, seq) logits, the layout curvlinops' CrossEntropyLoss expects."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits.transpose(1, 2)


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_factors_match_curvlinops_kfac_expand_empirical(tmp_path, arch):
    model, _ = build_tiny_model(arch=arch, seed=0, dtype=torch.float64, num_layers=2)
    blocks = torch.randint(1, 384, (4, 9), generator=torch.Generator().manual_seed(0))
    args = FactorArguments(fisher="empirical", batch_size=2, model_dtype="float64")
    collect_factors(
        model, blocks, tmp_path / "f", args, model_fingerprint="m", corpus_fingerprint="c", progress=False
    )
    ours = load_factors(tmp_path / "f")

    targets = find_targets(model)
    peer = curvlinops.KFACLinearOperator(
        LogitsForCrossEntropy(model),
        nn.CrossEntropyLoss(reduction="sum"),
        [model.get_submodule(t.name).weight for t in targets],
        [(blocks[:2, :-1], blocks[:2, 1:]), (blocks[2:, :-1], blocks[2:, 1:])],
        fisher_type=curvlinops.FisherType.EMPIRICAL,
        kfac_approx=curvlinops.KFACType.EXPAND,
        check_deterministic=False,
    )
    peer.compute_kronecker_factors()
    state = peer.state_dict()
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    for t in targets:
        mine = ours[t.name]
        assert mine.tokens == tokens
        torch.testing.assert_close(mine.A, state["input_covariances"][f"lm.{t.name}"], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(
            mine.G * tokens, state["gradient_covariances"][f"lm.{t.name}"], rtol=1e-10, atol=1e-13
        )
