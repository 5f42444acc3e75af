"""Levenshtein, per-probe scores, Table-1 aggregates and the positional stress test."""

from __future__ import annotations

import pytest

from memkfac.errors import MemkfacError
from memkfac.memorization import (
    exact_prefix_len,
    levenshtein,
    memorization_table,
    positional_stress_rows,
    score_continuation,
    stress_prompts,
    stress_summary,
    summarize,
    summary_table,
)
from memkfac.probes import Probe
from memkfac.tiny import build_tiny_model


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ([], [], 0),
        ([1, 2, 3], [], 3),
        ([], [4, 5], 2),
        ([1, 2, 3], [1, 2, 3], 0),
        ([1, 2, 3], [1, 9, 3], 1),  # one substitution
        ([1, 2, 3], [1, 3], 1),  # one deletion
        ([1, 3], [1, 2, 3], 1),  # one insertion
        ([1, 2, 3, 4], [2, 3, 4, 1], 2),  # rotation: delete the head, append it
        ([7, 1, 8, 2, 3], [1, 2, 3, 9], 3),  # kitten/sitting-like mix
        ([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], 6),  # reversal of 6 distinct tokens
    ],
)
def test_levenshtein_hand_cases(a, b, d):
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_levenshtein_kitten_sitting_on_characters():
    assert levenshtein([ord(c) for c in "kitten"], [ord(c) for c in "sitting"]) == 3
    assert levenshtein([ord(c) for c in "flaw"], [ord(c) for c in "lawn"]) == 2


def test_exact_prefix_and_scores():
    gold = [1, 2, 3, 4, 5, 6, 7, 8]
    assert exact_prefix_len([1, 2, 9, 4], gold) == 2
    assert exact_prefix_len([9], gold) == 0
    s = score_continuation([1, 2, 3, 4, 5, 6, 9, 8], gold)  # d = 1, L = 8
    assert (s.strict, s.loose, s.levenshtein, s.normalized_distance, s.exact_prefix_len) == (
        False,
        True,
        1,
        0.125,
        6,
    )
    edge = score_continuation([1, 2, 3, 4, 5, 6, 0, 0], gold)  # 1 - 2/8 = 0.75: loose at the boundary
    assert edge.loose and not edge.strict
    far = score_continuation([1, 2, 3, 4, 5, 0, 0, 0], gold)  # 1 - 3/8 < 0.75
    assert not far.loose
    assert score_continuation(gold, gold).strict
    with pytest.raises(MemkfacError):
        score_continuation([1], [])


def test_summarize_table1_columns():
    def row(kind, split, strict, loose, nd, epl):
        return dict(
            kind=kind, split=split, strict=strict, loose=loose, normalized_distance=nd, exact_prefix_len=epl
        )

    rows = [
        row("memorized", "sweep", True, True, 0.0, 8),
        row("memorized", "holdout", False, True, 0.25, 3),
        row("memorized", "holdout", False, False, 1.0, 0),
        row("control", "holdout", False, False, 0.5, 1),
    ]
    out = {(r["kind"], r["split"]): r for r in summarize(rows)}
    assert set(out) == {
        ("memorized", "sweep"),
        ("memorized", "holdout"),
        ("memorized", "all"),
        ("control", "holdout"),
    }
    hold = out[("memorized", "holdout")]
    assert (hold["n_probes"], hold["strict_pct"], hold["loose_pct"], hold["avg_lev"]) == (2, 0.0, 50.0, 0.625)
    total = out[("memorized", "all")]
    assert total["strict_pct"] == pytest.approx(100 / 3)
    assert total["mean_exact_prefix_len"] == pytest.approx(11 / 3)


def _overfit_probes(model, tok):
    """Probes whose suffix is the tiny model's own greedy continuation (memorized) or not (control)."""
    from memkfac.generation import greedy_continuations

    prompts = [
        tok(t, add_special_tokens=False).input_ids for t in ("Alice's email is", "The quick brown fox")
    ]
    own = greedy_continuations(model, tok, prompts, 6, progress=False)
    other = [(o + 1) % model.config.vocab_size for o in own[1]]  # never the model's own token

    def probe(pid, prompt, suffix, **kw):
        return Probe(pid, tok.decode(prompt), tok.decode(suffix), prefix_ids=prompt, suffix_ids=suffix, **kw)

    return [
        probe("m0", prompts[0], own[0], split="sweep"),
        probe("m1", prompts[1], own[1]),
        probe("c0", prompts[1], other, kind="control"),
    ]


def test_memorization_table_on_tiny_model():
    model, tok = build_tiny_model(seed=3)
    probes = _overfit_probes(model, tok)
    table = memorization_table(
        model, tok, probes, variant="base", probe_set="tiny", run_id="r1", progress=False
    )
    rows = {r["probe_id"]: r for r in table.to_pylist()}
    assert rows["m0"]["strict"] and rows["m1"]["strict"] and not rows["c0"]["strict"]
    assert rows["c0"]["levenshtein"] == 6 and rows["c0"]["normalized_distance"] == 1.0
    assert rows["m0"]["suffix_tokens"] == 6 and rows["m0"]["exact_prefix_len"] == 6
    summary = {(r["kind"], r["split"]): r for r in summary_table(table).to_pylist()}
    assert summary[("memorized", "all")]["strict_pct"] == 100.0
    assert summary[("control", "holdout")]["strict_pct"] == 0.0
    assert {r["variant"] for r in summary.values()} == {"base"}


def test_stress_prompts_enumerate_left_and_right_variants():
    prompt, gold = list(range(100, 130)), list(range(10))  # n = 30, L = 10
    variants = stress_prompts(prompt, gold, t=5)
    names = [v[0] for v in variants]
    assert names[:5] == ["left+1", "left+2", "left+3", "left+4", "left+5"]
    assert names[5:] == [f"right-{m}" for m in range(6, 30)]  # m = t+1 .. n-1
    left3 = dict((n, (p, g)) for n, p, g in variants)["left+3"]
    assert left3 == (prompt + [0, 1, 2], gold[3:])
    right7 = dict((n, (p, g)) for n, p, g in variants)["right-7"]
    assert right7 == (prompt[-7:], gold)
    assert len(stress_prompts(prompt, gold[:3], t=5)) == 2 + 24  # left variants stop at L-1


def test_positional_stress_on_tiny_model():
    model, tok = build_tiny_model(seed=3)
    probes = _overfit_probes(model, tok)[:2]
    rows = positional_stress_rows(model, tok, probes, t=2, progress=False)
    assert [r["original_match_len"] for r in rows] == [6, 6]
    for r, p in zip(rows, probes, strict=True):
        assert r["n_variants"] == len(stress_prompts(p.prefix_ids, p.suffix_ids, 2))
        # appending gold tokens to a prompt the model continues greedily reproduces the rest exactly
        assert r["perturbed_match_len"] >= 5
    s = stress_summary(rows)
    assert s["original_mean"] == 6.0 and s["original_std"] == 0.0
