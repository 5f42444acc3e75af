"""Memorization metrics: does greedy decoding from a probe's prefix reproduce its suffix?

Per probe (paper section 5.1, official evaluator): generate exactly L = |suffix| tokens greedily and
compare token ids with the gold suffix: strict = exact match; d = token-level Levenshtein distance;
loose = 1 - d/L >= 0.75; normalized distance d/L; and the longest exact-match prefix. Aggregates
are the paper's Table 1 columns: strict %, loose % and avgLev = mean d/L (higher = less memorized).

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
from memkfac.tables import make_table, new_run_id

LOOSE_THRESHOLD = 0.75


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


@dataclass(frozen=True)
class ContinuationScore:
    strict: bool
    loose: bool
    levenshtein: int  # d
    normalized_distance: float  # d / L
    exact_prefix_len: int


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
    )


def memorization_rows(
    model,
    tokenizer,
    probes,
    batch_size: int = 32,
    loose_threshold: float = LOOSE_THRESHOLD,
    progress: bool = True,
) -> list[dict]:
    """Generate and score every probe; one dict per probe with the ``memorization`` table's columns."""
    ids = probes_token_ids(probes, tokenizer, model_vocab_size(model))
    prompts, golds = [i[0] for i in ids], [i[1] for i in ids]
    generated = greedy_continuations(model, tokenizer, prompts, [len(g) for g in golds], batch_size, progress)
    rows = []
    for probe, prompt, gold, gen in zip(probes, prompts, golds, generated, strict=True):
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
            }
        )
    return rows


def summarize(rows: list[dict], loose_threshold: float = LOOSE_THRESHOLD) -> list[dict]:
    """Table 1 aggregates per (kind, split), plus split "all" per kind: ``memorization_summary`` rows."""
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
) -> pa.Table:
    """The per-probe ``memorization`` table of one model variant on one probe set."""
    rows = memorization_rows(model, tokenizer, probes, batch_size, loose_threshold, progress)
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
