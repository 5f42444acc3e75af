"""Levenshtein, ROUGE-L, exact memorization, extraction strength, per-probe scores, Table-1
aggregates and the positional stress test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memkfac.errors import MemkfacError
from memkfac.memorization import (
    exact_memorization,
    exact_prefix_len,
    extraction_strength,
    levenshtein,
    longest_common_subsequence,
    memorization_rows,
    memorization_table,
    positional_stress_rows,
    rouge_l_f1,
    score_continuation,
    stress_prompts,
    stress_summary,
    summarize,
    summary_table,
)
from memkfac.mia import suffix_token_stats
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


@pytest.mark.parametrize(
    ("generated", "gold", "lcs", "f1"),
    [
        ([1, 2, 3, 4], [1, 3, 4, 5], 3, 0.75),  # LCS 1,3,4: P = R = 3/4
        ([1, 2, 3, 4], [1, 2, 3, 4], 4, 1.0),  # identical
        ([], [1, 2, 3], 0, 0.0),  # empty generation
        ([7, 8, 9], [1, 2, 3], 0, 0.0),  # nothing shared
        ([1, 2], [1, 2, 3, 4], 2, 2 / 3),  # P = 1, R = 1/2: F1 = 2 * 1/2 / (3/2)
        ([4, 3, 2, 1], [1, 2, 3, 4], 1, 0.25),  # order matters: one token in common order
        ([1, 1, 1], [1, 2, 1], 2, 2 / 3),  # repeated tokens are matched once each
    ],
)
def test_rouge_l_hand_cases(generated, gold, lcs, f1):
    assert longest_common_subsequence(generated, gold) == lcs
    assert longest_common_subsequence(gold, generated) == lcs
    assert rouge_l_f1(generated, gold) == pytest.approx(f1)


def test_lcs_of_the_textbook_strings():
    # Cormen et al.: LCS("ABCBDAB", "BDCABA") = 4 ("BCBA")
    assert longest_common_subsequence([ord(c) for c in "ABCBDAB"], [ord(c) for c in "BDCABA"]) == 4


@pytest.mark.parametrize(
    ("hits", "em", "es"),
    [
        ([True] * 5, 1.0, 1.0),  # the prefix alone extracts the suffix: k* = 0
        ([False] * 4, 0.0, 0.0),  # the last token is wrong even given all before it: k* = L
        ([False, True, True, True], 0.75, 0.75),  # only the first token needs giving: k* = 1
        ([True, True, True, False], 0.75, 0.0),  # right until the last token: k* = 4
        ([True, False, True, False, True, True], 4 / 6, 1 - 4 / 6),  # last miss at 3: k* = 4
    ],
)
def test_exact_memorization_and_extraction_strength_hand_cases(hits, em, es):
    assert exact_memorization(hits) == pytest.approx(em)
    assert extraction_strength(hits) == pytest.approx(es)


class _Bigram(torch.nn.Module):
    """A 'language model' whose next-token logits are a fixed row of ``table`` per current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_exact_memorization_and_extraction_strength_from_constructed_logits():
    # argmax after token t is (t + 1) mod 6; the runner-up is t itself (a wrong guess scores low)
    table = torch.full((6, 6), -5.0)
    for t in range(6):
        table[t, (t + 1) % 6], table[t, t] = 3.0, 1.0
    model = _Bigram(table)
    prompts = [[0], [3, 4], [2]]
    suffixes = [
        [1, 2, 0, 4, 5],  # after 0->1 hit, 1->2 hit, 2->0 miss (3), 0->4 miss (1), 4->5 hit
        [5, 0, 1],  # every step follows the rule
        [4],  # after 2 the argmax is 3
    ]
    stats = suffix_token_stats(model, prompts, suffixes, batch_size=3, progress=False)
    hits = [s.argmax_hit.tolist() for s in stats]
    assert hits == [[True, True, False, False, True], [True, True, True], [False]]
    assert [exact_memorization(h) for h in hits] == [0.6, 1.0, 0.0]
    assert [extraction_strength(h) for h in hits] == pytest.approx([1 - 4 / 5, 1.0, 0.0])


def _detour_suffix(model, tok, prompt: list[int], length: int, at: int) -> list[int]:
    """The model's own greedy continuation of ``prompt`` with the token at ``at`` swapped for another,
    continued greedily after the swap: every argmax is right except at ``at``."""
    from memkfac.generation import greedy_continuations

    (own,) = greedy_continuations(model, tok, [prompt], at + 1, progress=False)
    head = own[:at] + [(own[at] + 1) % model.config.vocab_size]
    if at + 1 == length:
        return head
    (tail,) = greedy_continuations(model, tok, [prompt + head], length - at - 1, progress=False)
    return head + tail


def test_extraction_strength_equals_greedy_decoding_from_every_split_point():
    """k* from the teacher-forced argmax is the fewest gold tokens after which greedy decoding
    reproduces the rest of the suffix: checked against real greedy decoding at every k."""
    from memkfac.generation import greedy_continuations

    model, tok = build_tiny_model(seed=3)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 384, (10,), generator=g).tolist() for _ in range(5)]
    suffixes = [
        _detour_suffix(model, tok, prompts[0], 8, at=3),  # k* = 4
        _detour_suffix(model, tok, prompts[1], 8, at=0),  # k* = 1
        _detour_suffix(model, tok, prompts[2], 8, at=7),  # k* = 8
        greedy_continuations(model, tok, [prompts[3]], 8, progress=False)[0],  # k* = 0
        torch.randint(1, 384, (8,), generator=g).tolist(),  # wherever the random tokens fall
    ]
    stats = suffix_token_stats(model, prompts, suffixes, batch_size=5, progress=False)
    strengths = [extraction_strength(s.argmax_hit.tolist()) for s in stats]
    assert strengths[:4] == pytest.approx([0.5, 1 - 1 / 8, 0.0, 1.0])
    for prompt, suffix, stat, strength in zip(prompts, suffixes, stats, strengths, strict=True):
        hits = stat.argmax_hit.tolist()
        starts = [prompt + suffix[:k] for k in range(len(suffix))]
        counts = [len(suffix) - k for k in range(len(suffix))]
        greedy = greedy_continuations(model, tok, starts, counts, progress=False)
        reproduced = [gen == suffix[k:] for k, gen in enumerate(greedy)] + [True]  # k = L: nothing left
        assert reproduced == [all(hits[k:]) for k in range(len(suffix) + 1)]
        k_star = reproduced.index(True)
        assert strength == pytest.approx(1 - k_star / len(suffix))


def test_exact_prefix_and_scores():
    gold = [1, 2, 3, 4, 5, 6, 7, 8]
    assert exact_prefix_len([1, 2, 9, 4], gold) == 2
    assert exact_prefix_len([9], gold) == 0
    s = score_continuation([1, 2, 3, 4, 5, 6, 9, 8], gold)  # d = 1, L = 8
    assert (s.strict, s.loose, s.levenshtein, s.normalized_distance, s.exact_prefix_len, s.verbmem) == (
        False,
        True,
        1,
        0.125,
        6,
        0.875,  # LCS 7 of 8
    )
    edge = score_continuation([1, 2, 3, 4, 5, 6, 0, 0], gold)  # 1 - 2/8 = 0.75: loose at the boundary
    assert edge.loose and not edge.strict
    far = score_continuation([1, 2, 3, 4, 5, 0, 0, 0], gold)  # 1 - 3/8 < 0.75
    assert not far.loose
    assert score_continuation(gold, gold).strict
    with pytest.raises(MemkfacError):
        score_continuation([1], [])


def test_summarize_table1_columns():
    def row(kind, split, strict, loose, nd, epl, field):
        verbmem, em, es = field
        return dict(
            kind=kind, split=split, strict=strict, loose=loose, normalized_distance=nd, exact_prefix_len=epl
        ) | dict(verbmem=verbmem, exact_memorization=em, extraction_strength=es)

    rows = [
        row("memorized", "sweep", True, True, 0.0, 8, (1.0, 1.0, 1.0)),
        row("memorized", "holdout", False, True, 0.25, 3, (0.75, 0.5, 0.25)),
        row("memorized", "holdout", False, False, 1.0, 0, (0.25, 0.0, 0.0)),
        row("control", "holdout", False, False, 0.5, 1, (0.5, 0.125, 0.0)),
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
    assert (hold["verbmem"], hold["exact_memorization"], hold["extraction_strength"]) == (0.5, 0.25, 0.125)
    assert (total["verbmem"], total["exact_memorization"], total["extraction_strength"]) == pytest.approx(
        (2 / 3, 1.5 / 3, 1.25 / 3)
    )
    control = out[("control", "holdout")]
    assert [control[m] for m in ("verbmem", "exact_memorization", "extraction_strength")] == [0.5, 0.125, 0.0]


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
    for pid in ("m0", "m1"):  # the model's own continuation: every field measure is at its maximum
        assert (rows[pid]["verbmem"], rows[pid]["exact_memorization"], rows[pid]["extraction_strength"]) == (
            1.0,
            1.0,
            1.0,
        )
    control = rows["c0"]
    assert control["verbmem"] == rouge_l_f1(control["generated_ids"], probes[2].suffix_ids)
    assert control["exact_memorization"] < 1 and control["extraction_strength"] < 1  # the first token misses
    summary = {(r["kind"], r["split"]): r for r in summary_table(table).to_pylist()}
    assert summary[("memorized", "all")]["strict_pct"] == 100.0
    assert summary[("memorized", "all")]["extraction_strength"] == 1.0
    assert summary[("control", "holdout")]["verbmem"] == control["verbmem"]
    assert summary[("control", "holdout")]["strict_pct"] == 0.0
    assert {r["variant"] for r in summary.values()} == {"base"}


def test_recall_only_rows_skip_the_teacher_forced_pass(monkeypatch):
    """``teacher_forced=False``: the same recall, no teacher-forced forward, its two measures None."""
    import memkfac.memorization as memorization

    model, tok = build_tiny_model(seed=3)
    probes = _overfit_probes(model, tok)
    full = memorization_rows(model, tok, probes, progress=False)
    monkeypatch.setattr(memorization, "suffix_token_stats", lambda *a, **k: pytest.fail("pass not skipped"))
    recall_only = memorization_rows(model, tok, probes, progress=False, teacher_forced=False)
    for a, b in zip(full, recall_only, strict=True):
        assert {k: v for k, v in a.items() if k not in ("exact_memorization", "extraction_strength")} == {
            k: v for k, v in b.items() if k not in ("exact_memorization", "extraction_strength")
        }
        assert b["exact_memorization"] is None and b["extraction_strength"] is None
    summary = summarize(recall_only)
    assert all(r["exact_memorization"] is None and r["verbmem"] is not None for r in summary)
    assert [r["strict_pct"] for r in summary] == [r["strict_pct"] for r in summarize(full)]


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
