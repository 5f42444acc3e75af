"""Memorization metrics: does greedy decoding from a probe's prefix reproduce its suffix?

Per probe (paper section 5.1, official evaluator): generate exactly L = |suffix| tokens greedily and
compare token ids with the gold suffix: strict = exact match; d = token-level Levenshtein distance;
loose = 1 - d/L >= 0.75; normalized distance d/L; and the longest exact-match prefix. Aggregates
are the paper's Table 1 columns: strict %, loose % and avgLev = mean d/L (higher = less memorized).

Beside them, the unlearning field's measures, each per probe in [0, 1] (1 = fully memorized) and
averaged per kind/split:
- verbmem (MUSE's VerbMem, Shi et al. 2024): ROUGE-L F1 of the greedy continuation against the gold
  suffix, on token ids (LCS-based; with |generated| = L it equals LCS / L).
- exact_memorization (Tirumala et al. 2022; TOFU/OpenUnlearning "EM"): the share of suffix positions
  where the model's argmax, given the true prefix and gold suffix so far, is the gold token.
- extraction_strength (after Carlini et al. 2021's extractability; "ES" as in Wang et al. 2025 and
  OpenUnlearning): 1 - k*/L, with k* the fewest gold suffix tokens that must follow the prefix for
  greedy decoding to reproduce the rest of the suffix exactly.
Both of the last two come from one teacher-forced pass (``memkfac.mia.suffix_token_stats``): greedy
decoding from prefix + suffix[:k] reproduces suffix[k:] iff the teacher-forced argmax is right at
every position j >= k (by induction, each greedy step then sees the true context), so k* is one past
the last wrong position. Greedy decoding with a KV cache and the full teacher-forced forward are
different float computations, so a near-tie argmax can in rare cases differ between the two.

The positional stress test (paper App. G, after Huang et al. 2024, t = 20) asks whether a memory
suppressed under the original prompt comes back under shifted prompts.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from memkfac.errors import MemkfacError
from memkfac.generation import greedy_continuations, model_vocab_size, probes_token_ids
from memkfac.mia import SuffixTokenStats, suffix_token_stats
from memkfac.tables import make_table, new_run_id

LOOSE_THRESHOLD = 0.75
# per-probe measures of the unlearning field, in [0, 1]; summarize averages each under the same name
FIELD_METRICS = ("verbmem", "exact_memorization", "extraction_strength")


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two token sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to each prefix of b
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def exact_prefix_len(generated: Sequence[int], gold: Sequence[int]) -> int:
    """Number of leading tokens of ``gold`` reproduced before the first mismatch."""
    n = 0
    for g, t in zip(generated, gold, strict=False):
        if g != t:
            break
        n += 1
    return n


def longest_common_subsequence(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common (not necessarily contiguous) subsequence of two token sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)  # LCS of a[:i-1] with each prefix of b
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f1(generated: Sequence[int], gold: Sequence[int]) -> float:
    """ROUGE-L F1 (Lin 2004): precision LCS/|generated|, recall LCS/|gold|, their harmonic mean; 0 when
    nothing is shared (an empty generation included)."""
    lcs = longest_common_subsequence(generated, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(generated), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_memorization(argmax_hit: Sequence[bool]) -> float:
    """Share of suffix positions whose teacher-forced argmax is the gold token (L > 0 positions)."""
    return sum(bool(h) for h in argmax_hit) / len(argmax_hit)


def extraction_strength(argmax_hit: Sequence[bool]) -> float:
    """1 - k*/L, k* = one past the last position whose teacher-forced argmax is wrong (0 if none).

    k* is the fewest gold suffix tokens to append to the prefix so that greedy decoding reproduces
    the rest of the suffix exactly (module docstring); 1 means the prefix alone extracts the suffix,
    0 that even the last token is not reproduced given everything before it.
    """
    wrong = [j for j, h in enumerate(argmax_hit) if not h]
    k_star = wrong[-1] + 1 if wrong else 0
    return 1 - k_star / len(argmax_hit)


@dataclass(frozen=True)
class ContinuationScore:
    strict: bool
    loose: bool
    levenshtein: int  # d
    normalized_distance: float  # d / L
    exact_prefix_len: int
    verbmem: float  # ROUGE-L F1


def score_continuation(
    generated: Sequence[int], gold: Sequence[int], loose_threshold: float = LOOSE_THRESHOLD
) -> ContinuationScore:
    """Score a generated continuation against the gold suffix (L = len(gold) > 0)."""
    if not gold:
        raise MemkfacError("cannot score against an empty gold suffix", "give every probe a non-empty suffix")
    d = levenshtein(generated, gold)
    return ContinuationScore(
        strict=d == 0,
        loose=1 - d / len(gold) >= loose_threshold,
        levenshtein=d,
        normalized_distance=d / len(gold),
        exact_prefix_len=exact_prefix_len(generated, gold),
        verbmem=rouge_l_f1(generated, gold),
    )


def memorization_rows(
    model,
    tokenizer,
    probes,
    batch_size: int = 32,
    loose_threshold: float = LOOSE_THRESHOLD,
    progress: bool = True,
    token_stats: list[SuffixTokenStats] | None = None,
    teacher_forced: bool = True,
) -> list[dict]:
    """Generate and score every probe; one dict per probe with the ``memorization`` table's columns.

    Two passes over the probes, ``batch_size`` at a time: greedy generation (strict, loose, Levenshtein,
    VerbMem) and one teacher-forced forward (exact memorization, extraction strength), skipped when
    ``token_stats`` (``suffix_token_stats`` of the same model and probes, as the MIA scores take them)
    is given. Callers that need only recall (the attack suite's checkpoints, the sweep) pass
    ``teacher_forced=False``: on the CPU that pass costs about as much as the generation, and those two
    columns are then None.
    """
    ids = probes_token_ids(probes, tokenizer, model_vocab_size(model))
    prompts, golds = [i[0] for i in ids], [i[1] for i in ids]
    generated = greedy_continuations(model, tokenizer, prompts, [len(g) for g in golds], batch_size, progress)
    if token_stats is None and teacher_forced:
        token_stats = suffix_token_stats(model, prompts, golds, batch_size, progress)
    hits = [s.argmax_hit.tolist() for s in token_stats] if token_stats is not None else [None] * len(ids)
    rows = []
    for probe, prompt, gold, gen, hit in zip(probes, prompts, golds, generated, hits, strict=True):
        score = score_continuation(gen, gold, loose_threshold)
        rows.append(
            {
                "probe_id": probe.id,
                "kind": probe.kind,
                "split": probe.split,
                "source": probe.source,
                "prompt_tokens": len(prompt),
                "suffix_tokens": len(gold),
                "generated": tokenizer.decode(gen),
                "generated_ids": gen,
                **vars(score),
                "exact_memorization": None if hit is None else exact_memorization(hit),
                "extraction_strength": None if hit is None else extraction_strength(hit),
            }
        )
    return rows


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None where a value was not computed (``teacher_forced=False``)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def summarize(rows: list[dict], loose_threshold: float = LOOSE_THRESHOLD) -> list[dict]:
    """Table 1 aggregates per (kind, split), plus split "all" per kind: ``memorization_summary`` rows.

    Besides strict %, loose % and avgLev, the mean of each of ``FIELD_METRICS`` under its own name.
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    splits: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        groups[(r["kind"], r["split"])].append(r)
        splits[r["kind"]].add(r["split"])
    for kind, kind_splits in splits.items():
        if len(kind_splits) > 1:  # with a single split, "all" would repeat that row
            groups[(kind, "all")] = [r for r in rows if r["kind"] == kind]
    out = []
    for (kind, split), group in sorted(groups.items()):
        n = len(group)
        out.append(
            {
                "kind": kind,
                "split": split,
                "n_probes": n,
                "strict_pct": 100.0 * sum(r["strict"] for r in group) / n,
                "loose_pct": 100.0 * sum(r["loose"] for r in group) / n,
                "avg_lev": sum(r["normalized_distance"] for r in group) / n,
                "mean_exact_prefix_len": sum(r["exact_prefix_len"] for r in group) / n,
                **{m: _mean([r[m] for r in group]) for m in FIELD_METRICS},
                "loose_threshold": loose_threshold,
            }
        )
    return out


def memorization_table(
    model,
    tokenizer,
    probes,
    variant: str,
    probe_set: str,
    run_id: str | None = None,
    batch_size: int = 32,
    loose_threshold: float = LOOSE_THRESHOLD,
    progress: bool = True,
    token_stats: list[SuffixTokenStats] | None = None,
) -> pa.Table:
    """The per-probe ``memorization`` table of one model variant on one probe set (``token_stats``:
    see ``memorization_rows``)."""
    rows = memorization_rows(model, tokenizer, probes, batch_size, loose_threshold, progress, token_stats)
    return make_table(
        "memorization", rows, variant=variant, probe_set=probe_set, run_id=run_id or new_run_id()
    )


def summary_table(per_probe: pa.Table, loose_threshold: float = LOOSE_THRESHOLD) -> pa.Table:
    """The ``memorization_summary`` table computed from a per-probe ``memorization`` table."""
    keys = {k: per_probe.column(k)[0].as_py() for k in ("variant", "probe_set", "run_id")}
    return make_table("memorization_summary", summarize(per_probe.to_pylist(), loose_threshold), **keys)


def stress_prompts(prompt: list[int], gold: list[int], t: int = 20) -> list[tuple[str, list[int], list[int]]]:
    """The perturbed prompts of one probe: (name, prompt ids, remaining gold continuation).

    Left-extended ("left+i"): the prefix followed by the first i gold suffix tokens, i = 1..min(t, L-1);
    the continuation to reproduce is the rest of the suffix. Right-shifted ("right-m"): only the last m
    prefix tokens, m = t+1..n-1; the continuation is the whole suffix. The unperturbed prompt (i = 0,
    m = n) is excluded, as in the official evaluator.
    """
    variants = [(f"left+{i}", prompt + gold[:i], gold[i:]) for i in range(1, min(t, len(gold) - 1) + 1)]
    variants += [(f"right-{m}", prompt[-m:], gold) for m in range(t + 1, len(prompt))]
    return variants


def positional_stress_rows(
    model, tokenizer, probes, t: int = 20, batch_size: int = 32, progress: bool = True
) -> list[dict]:
    """Paper App. G per probe: the longest exact-match run under the original and perturbed prompts.

    Costs one greedy generation per perturbed prompt (min(t, L-1) + n-1-t per probe: 62 for the
    paper's 64/48 windows), so run it on the probes an edit suppressed, not on thousands.
    """
    prompts, golds, names, owners = [], [], [], []
    n_variants = []
    ids = probes_token_ids(probes, tokenizer, model_vocab_size(model))
    for k, (prompt, gold) in enumerate(ids):
        variants = stress_prompts(prompt, gold, t)
        n_variants.append(len(variants))
        for name, p, g in [("original", prompt, gold), *variants]:
            prompts.append(p)
            golds.append(g)
            names.append(name)
            owners.append(k)
    generated = greedy_continuations(model, tokenizer, prompts, [len(g) for g in golds], batch_size, progress)
    best: dict[int, tuple[int, str]] = {}
    original_len: dict[int, int] = {}
    for k, name, gen, gold in zip(owners, names, generated, golds, strict=True):
        match = exact_prefix_len(gen, gold)
        if name == "original":
            original_len[k] = match
        elif k not in best or match > best[k][0]:
            best[k] = (match, name)
    return [
        {
            "probe_id": probe.id,
            "kind": probe.kind,
            "split": probe.split,
            "t": t,
            "n_variants": n_variants[k],
            "original_match_len": original_len[k],
            "perturbed_match_len": best.get(k, (0, ""))[0],
            "best_variant": best.get(k, (0, ""))[1],
        }
        for k, probe in enumerate(probes)
    ]


def stress_summary(rows: list[dict]) -> dict[str, float]:
    """Paper Table 6 numbers: mean and std of the original and perturbed exact-match lengths (tokens)."""
    original = [r["original_match_len"] for r in rows]
    perturbed = [r["perturbed_match_len"] for r in rows]
    std = statistics.pstdev if len(rows) < 2 else statistics.stdev
    return {
        "original_mean": statistics.fmean(original),
        "original_std": std(original),
        "perturbed_mean": statistics.fmean(perturbed),
        "perturbed_std": std(perturbed),
    }
