"""Membership-inference scores, the rank AUC and the TPR at 1% FPR."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from memkfac.errors import MemkfacError
from memkfac.mia import SCORE_ORIENTATION, auc_rows, mia_tables, rank_auc, suffix_token_stats, tpr_at_fpr
from memkfac.probes import Probe
from memkfac.tiny import build_tiny_model


def test_rank_auc_hand_cases():
    assert rank_auc([3, 4], [1, 2]) == 1.0
    assert rank_auc([1, 2], [3, 4]) == 0.0
    assert rank_auc([1, 3], [2, 4]) == 0.25  # pairs won: (3>2) of 4
    assert rank_auc([2], [2]) == 0.5  # a tie counts half
    assert rank_auc([2, 5], [2, 1, 0]) == pytest.approx((2.5 + 3) / 6)  # 2 vs {2,1,0}: 0.5+1+1
    with pytest.raises(MemkfacError):
        rank_auc([], [1.0])


def test_tpr_at_fpr_hand_cases():
    assert tpr_at_fpr([3, 4], [1, 2]) == 1.0
    assert tpr_at_fpr([1, 2], [3, 4]) == 0.0
    # under 100 non-members no false positive is allowed: the threshold is the top non-member (2), and
    # the member tied with it is not flagged
    assert tpr_at_fpr([5, 2, 1], [2, 0]) == pytest.approx(1 / 3)
    assert tpr_at_fpr([5, 2, 1], [2, 1], max_fpr=0.5) == pytest.approx(2 / 3)  # 1 of 2 may be flagged
    hundred = list(range(100))  # non-members 0..99: one false positive allowed, threshold 98
    assert tpr_at_fpr([99.5, 98.5, 98, 50], hundred) == 0.5
    assert tpr_at_fpr([99.5, 98.5, 98, 50], hundred[1:]) == 0.25  # 99 non-members: threshold 99
    assert tpr_at_fpr([99.5, 98.5, 98, 50], [99, *hundred[1:]]) == 0.25  # a tie at the top: threshold 99
    assert tpr_at_fpr([99.5, 98.5, 97.5, 50], list(range(200))) == 0.0  # two allowed: threshold 197
    assert tpr_at_fpr([198.5, 197.5, 197, 50], list(range(200))) == 0.5
    assert tpr_at_fpr([1, 2], [3, 4], max_fpr=1.0) == 1.0  # flag everything
    with pytest.raises(MemkfacError):
        tpr_at_fpr([1.0], [])


def test_tpr_at_fpr_is_the_best_threshold_of_the_empirical_roc():
    """Against brute force over every threshold (each distinct score and below all), with many ties."""
    rng = random.Random(0)
    for n0 in (7, 99, 100, 101, 250):
        members = [rng.randint(0, 30) for _ in range(rng.randint(1, 40))]
        nonmembers = [rng.randint(0, 25) for _ in range(n0)]
        best = 0.0
        for t in [-1, *set(members + nonmembers)]:
            fpr = sum(v > t for v in nonmembers) / n0
            if fpr <= 0.01:
                best = max(best, sum(v > t for v in members) / len(members))
        assert tpr_at_fpr(members, nonmembers) == best, n0


def test_auc_orients_scores_so_higher_means_member():
    rows = [
        dict(kind="memorized", loss=0.1, zlib_ratio=0.01, min_k=-0.5, min_k_pp=1.0),
        dict(kind="memorized", loss=0.2, zlib_ratio=0.02, min_k=-0.6, min_k_pp=0.8),
        dict(kind="control", loss=3.0, zlib_ratio=0.30, min_k=-6.0, min_k_pp=-2.0),
    ]
    out = auc_rows(rows)
    assert {r["score"]: r["auc"] for r in out} == {
        "loss": 1.0,
        "zlib_ratio": 1.0,
        "min_k": 1.0,
        "min_k_pp": 1.0,
    }
    assert {r["score"]: r["tpr_at_1pct_fpr"] for r in out} == dict.fromkeys(SCORE_ORIENTATION, 1.0)
    # the second member's loss ties the control's: it is no longer flagged at 0 false positives
    tied = auc_rows([rows[0], rows[1] | {"loss": 3.0}, rows[2]])
    assert next(r["tpr_at_1pct_fpr"] for r in tied if r["score"] == "loss") == 0.5


def test_suffix_stats_match_a_direct_computation():
    model, _ = build_tiny_model(seed=4)
    prompts, suffixes = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    stats = suffix_token_stats(model, prompts, suffixes, batch_size=2, progress=False)
    for p, s, (logp, std, hit) in zip(prompts, suffixes, stats, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p + s])).logits[0, len(p) - 1 : -1]
        lp = torch.log_softmax(logits, -1)
        assert hit.tolist() == (logits.argmax(-1) == torch.tensor(s)).tolist()
        gold = lp[torch.arange(len(s)), torch.tensor(s)]
        mu = (lp.exp() * lp).sum(-1)
        sigma = ((lp.exp() * (lp - mu[:, None]) ** 2).sum(-1)).sqrt()
        torch.testing.assert_close(logp, gold, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std, (gold - mu) / sigma, atol=1e-4, rtol=1e-4)


def test_mia_tables_separate_own_continuations_from_controls():
    from memkfac.generation import greedy_continuations

    model, tok = build_tiny_model(seed=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 384, (12,), generator=g).tolist() for _ in range(8)]
    own = greedy_continuations(model, tok, prompts, 10, progress=False)
    probes = [
        Probe(f"m{i}", "", "", prefix_ids=p, suffix_ids=o)
        for i, (p, o) in enumerate(zip(prompts, own, strict=True))
    ]
    probes += [
        Probe(
            f"c{i}",
            "",
            "",
            kind="control",
            prefix_ids=p,
            suffix_ids=torch.randint(1, 384, (10,), generator=g).tolist(),
        )
        for i, p in enumerate(prompts)
    ]
    per_probe, auc = mia_tables(model, tok, probes, variant="base", probe_set="t", progress=False)
    rows = per_probe.to_pylist()
    for r, p in zip(rows, probes, strict=True):
        text = tok.decode(p.suffix_ids).encode()
        assert r["zlib_ratio"] == pytest.approx(r["loss"] / len(zlib.compress(text)))
        assert r["min_k"] <= -r["loss"] + 1e-9  # the lowest 20% are below the mean log-prob
        assert math.isfinite(r["min_k_pp"])
    aucs = {r["score"]: r["auc"] for r in auc.to_pylist()}
    assert aucs["loss"] == 1.0 and aucs["min_k_pp"] > 0.9  # greedy tokens are the model's likeliest
    tprs = {r["score"]: r["tpr_at_1pct_fpr"] for r in auc.to_pylist()}
    assert tprs["loss"] == 1.0  # AUC 1: every member's loss is below every control's
    only_members, none = mia_tables(model, tok, probes[:8], variant="base", probe_set="t", progress=False)
    assert none is None and only_members.num_rows == 8
