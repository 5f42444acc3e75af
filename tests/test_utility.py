"""Perplexity from exact sums (and the official batch-mean variant) and nDCG@k hand cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memkfac.errors import MemkfacError
from memkfac.tiny import build_tiny_model
from memkfac.utility import heldout_pass, ndcg, ndcg_from_lists, perplexity, topk_lists

LOG3 = math.log2(3)
IDCG2 = 2 + 1 / LOG3  # k = 2


@pytest.mark.parametrize(
    ("edited", "reference", "paper", "official"),
    [
        ([1, 2], [1, 2], 1.0, 1.0),  # identical
        ([2, 1], [1, 2], 1.0, (1 + 2 / LOG3) / IDCG2),  # swapped: paper ignores order, official does not
        ([1, 3], [1, 2], 2 / IDCG2, 2 / IDCG2),  # top token kept, second lost
        ([3, 1], [1, 2], (1 / LOG3) / IDCG2, (2 / LOG3) / IDCG2),  # reference top moved to rank 2
        ([3, 4], [1, 2], 0.0, 0.0),  # disjoint
    ],
)
def test_ndcg_hand_cases_k2(edited, reference, paper, official):
    got = ndcg_from_lists(torch.tensor([edited]), torch.tensor([reference]))
    assert got["ndcg"] == pytest.approx(paper)
    assert got["ndcg_official"] == pytest.approx(official)
    assert (got["n_positions"], got["k"]) == (1, 2)


def test_ndcg_k3_and_averaging():
    # k = 3, reference [a, b, c]; edited [c, x, a]: paper rel = (3, 0, 1); official rel = (1, 0, 3)
    idcg = 3 + 2 / math.log2(3) + 1 / 2
    got = ndcg_from_lists(torch.tensor([[7, 9, 5], [5, 6, 7]]), torch.tensor([[5, 6, 7], [5, 6, 7]]))
    assert got["ndcg"] == pytest.approx(((3 + 1 / 2) / idcg + 1) / 2)
    assert got["ndcg_official"] == pytest.approx(((1 + 3 / 2) / idcg + 1) / 2)
    with pytest.raises(MemkfacError, match="shape"):
        ndcg_from_lists(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


def test_perplexity_is_exp_mean_nll_and_official_variant_is_batch_mean():
    model, _ = build_tiny_model(seed=5)
    blocks = torch.randint(1, 384, (5, 9), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, blocks, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 384), blocks[:, 1:].reshape(-1), reduction="none").view(5, 8)
    assert got["n_tokens"] == 40 and got["n_blocks"] == 5 and got["block_len"] == 9
    assert got["mean_nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    batch_means = [nll[0:2].mean(), nll[2:4].mean(), nll[4:5].mean()]
    assert got["perplexity_batch_mean"] == pytest.approx(sum(math.exp(b) for b in batch_means) / 3, rel=1e-5)
    assert got["perplexity_batch_mean"] >= got["perplexity"]
    with pytest.raises(MemkfacError, match="held-out blocks"):
        perplexity(model, blocks[:, :1], progress=False)


def test_ndcg_of_a_model_against_itself_and_a_different_model():
    base, _ = build_tiny_model(seed=5)
    other, _ = build_tiny_model(seed=6)
    blocks = torch.randint(1, 384, (3, 8), generator=torch.Generator().manual_seed(1))
    reference = topk_lists(base, blocks, k=10, batch_size=2, progress=False)
    assert reference.shape == (3, 8, 10)
    same = ndcg(base, blocks, reference, progress=False)
    assert same["ndcg"] == pytest.approx(1.0) and same["ndcg_official"] == pytest.approx(1.0)
    assert same["n_positions"] == 24
    diff = ndcg(other, blocks, reference, progress=False)
    assert diff["ndcg_official"] <= diff["ndcg"] < 0.9


def test_one_heldout_pass_gives_the_perplexity_and_the_topk_lists_of_the_model():
    model, _ = build_tiny_model(seed=5)
    blocks = torch.randint(1, 384, (5, 9), generator=torch.Generator().manual_seed(2))
    row, topk = heldout_pass(model, blocks, batch_size=2, k=4, progress=False)
    with torch.no_grad():
        logits = model(blocks).logits
    assert torch.equal(topk, logits.topk(4, dim=-1).indices)
    assert row == perplexity(model, blocks, batch_size=2, progress=False)
    assert heldout_pass(model, blocks, batch_size=2, progress=False)[1] is None
