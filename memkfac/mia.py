"""Membership-inference scores of a probe's suffix given its prefix, and their AUC.

Per probe, from one teacher-forced pass over prefix + suffix (log-probs of the suffix tokens only):
- loss: mean NLL of the suffix tokens (nats); low for memorized text.
- zlib ratio (Carlini et al. 2021): loss / zlib-compressed byte length of the suffix text; divides
  out how predictable the text is by itself.
- Min-K% (Shi et al. 2024, k = 20%): mean of the lowest k% token log-probs; high for members.
- Min-K%++ (Zhang et al. 2024, k = 20%): the same over standardized log-probs
  (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the mean and std of log p(z) under the model's
  own next-token distribution at position t.

AUC (by ranks, ties averaged: the Mann-Whitney statistic) measures how well each score separates
trained probes (kind "memorized") from control probes. Each score is oriented so that higher means
member before the AUC is taken (loss and zlib ratio are negated); 0.5 is chance, 1.0 perfect.
Beside it, the TPR at 1% FPR (Carlini et al. 2022, "Membership inference attacks from first
principles"): the share of members an attacker flags while wrongly flagging at most 1% of
non-members, read exactly off the empirical ROC curve (``tpr_at_fpr``).

The same teacher-forced pass also says whether the model's argmax at each suffix position is the gold
token, which memorization's exact memorization and extraction strength are computed from.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memkfac.errors import MemkfacError
from memkfac.generation import model_vocab_size, probes_token_ids
from memkfac.tables import make_table, new_run_id

MIN_K_FRACTION = 0.2
MAX_FPR = 0.01  # the operating point of tpr_at_1pct_fpr
# score column -> sign that makes "higher = member"
SCORE_ORIENTATION = {"loss": -1.0, "zlib_ratio": -1.0, "min_k": 1.0, "min_k_pp": 1.0}


def _lowest_fraction_mean(values: torch.Tensor, fraction: float) -> float:
    k = max(1, int(fraction * len(values)))
    return values.topk(k, largest=False).values.mean().item()


class SuffixTokenStats(NamedTuple):
    """Teacher-forced statistics of one probe's gold suffix, each of shape (L,), L = |suffix|."""

    logp: torch.Tensor  # fp32: log p(gold token | prefix + gold suffix before it), nats
    standardized: torch.Tensor  # fp32: its Min-K%++ value (logp - mu) / sigma
    argmax_hit: torch.Tensor  # bool: the model's most likely next token there is the gold token


@torch.no_grad()
def suffix_token_stats(
    model, prompts: list[list[int]], suffixes: list[list[int]], batch_size: int = 16, progress: bool = True
) -> list[SuffixTokenStats]:
    """One teacher-forced forward over prefix + suffix per batch; a ``SuffixTokenStats`` per probe.

    Sequences are right-padded (teacher forcing needs no left alignment) and the padding is masked.
    The argmax is taken on the model's own logits, as greedy decoding takes it, so a tie breaks the
    same way (the lowest token id).
    """
    device = next(model.parameters()).device
    out: list[SuffixTokenStats] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="suffix log-probs", disable=not progress):
        batch = list(
            zip(prompts[start : start + batch_size], suffixes[start : start + batch_size], strict=True)
        )
        width = max(len(p) + len(s) for p, s in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, s) in enumerate(batch):
            ids[row, : len(p) + len(s)] = torch.as_tensor(p + s)
            mask[row, : len(p) + len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, (p, s) in enumerate(batch):
            predicting = logits[row, len(p) - 1 : len(p) + len(s) - 1]  # (L, V): the suffix's predictions
            gold_ids = torch.as_tensor(s, device=predicting.device)
            lp = F.log_softmax(predicting.float(), -1)
            gold = lp.gather(-1, gold_ids[:, None])[:, 0]
            probs = lp.exp()
            mu = (probs * lp).sum(-1)
            sigma = (
                (probs * (lp - mu[:, None]).square()).sum(-1).clamp(min=1e-12).sqrt()
            )  # centred: exact in fp32
            hit = predicting.argmax(-1) == gold_ids
            out.append(SuffixTokenStats(gold.cpu(), ((gold - mu) / sigma).cpu(), hit.cpu()))
    return out


def probe_token_stats(model, tokenizer, probes, batch_size: int = 16, progress: bool = True):
    """``suffix_token_stats`` of every probe (checked against the model's vocabulary first)."""
    ids = probes_token_ids(probes, tokenizer, model_vocab_size(model))
    return suffix_token_stats(model, [i[0] for i in ids], [i[1] for i in ids], batch_size, progress)


def mia_rows(
    model,
    tokenizer,
    probes,
    batch_size: int = 16,
    k: float = MIN_K_FRACTION,
    progress: bool = True,
    token_stats: list[SuffixTokenStats] | None = None,
):
    """One dict per probe with the ``mia`` table's columns; ``token_stats`` (``probe_token_stats`` of
    the same model and probes) saves the forward pass when the caller already has it."""
    ids = probes_token_ids(probes, tokenizer, model_vocab_size(model))
    if token_stats is None:
        token_stats = suffix_token_stats(
            model, [i[0] for i in ids], [i[1] for i in ids], batch_size, progress
        )
    rows = []
    for probe, (_, suffix), (logp, standardized, _) in zip(probes, ids, token_stats, strict=True):
        loss = -logp.mean().item()
        text = tokenizer.decode(suffix).encode("utf-8")
        rows.append(
            {
                "probe_id": probe.id,
                "kind": probe.kind,
                "split": probe.split,
                "n_tokens": len(suffix),
                "loss": loss,
                "zlib_ratio": loss / len(zlib.compress(text)),
                "min_k": _lowest_fraction_mean(logp, k),
                "min_k_pp": _lowest_fraction_mean(standardized, k),
            }
        )
    return rows


def rank_auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + 0.5 P(tie), from average ranks (Mann-Whitney U)."""
    if not members or not nonmembers:
        raise MemkfacError("AUC needs at least one member and one non-member score", "add control probes")
    values = sorted([(v, 1) for v in members] + [(v, 0) for v in nonmembers])
    rank_sum, i = 0.0, 0
    while i < len(values):
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2  # ranks i+1..j share their mean
        rank_sum += average_rank * sum(is_member for _, is_member in values[i:j])
        i = j
    n1, n0 = len(members), len(nonmembers)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], max_fpr: float = MAX_FPR) -> float:
    """The largest true-positive rate at a threshold whose false-positive rate is at most ``max_fpr``.

    Exact, from the empirical ROC curve (no interpolation): a probe is called a member when its score
    is strictly above a threshold t. With n0 non-members, at most m = floor(max_fpr * n0) false
    positives are allowed, so the best t is the (m+1)-th highest non-member score (any lower t flags
    m+1 of them); the TPR is the share of members strictly above it. Ties: a member tied with that
    non-member score is not flagged, since no threshold separates tied scores. Small samples: with
    fewer than 1 / max_fpr non-members (100 at 1%) m is 0, so the rate is the share of members above
    every non-member score; a single high-scoring non-member can pull it to 0.
    """
    if not members or not nonmembers:
        raise MemkfacError("TPR at a fixed FPR needs member and non-member scores", "add control probes")
    # + 1e-9: the float product of a decimal rate can fall just below the integer it stands for
    allowed = math.floor(max_fpr * len(nonmembers) + 1e-9)
    if allowed >= len(nonmembers):
        return 1.0
    threshold = sorted(nonmembers, reverse=True)[allowed]
    return sum(v > threshold for v in members) / len(members)


def auc_rows(rows: list[dict], member_kind: str = "memorized", nonmember_kind: str = "control") -> list[dict]:
    """``mia_auc`` rows: the AUC, and the TPR at 1% FPR, of each score separating ``member_kind`` from
    ``nonmember_kind`` probes (non-finite scores left out)."""
    out = []
    for score, sign in SCORE_ORIENTATION.items():
        members = [sign * r[score] for r in rows if r["kind"] == member_kind and math.isfinite(r[score])]
        nonmembers = [
            sign * r[score] for r in rows if r["kind"] == nonmember_kind and math.isfinite(r[score])
        ]
        out.append(
            {
                "score": score,
                "member_kind": member_kind,
                "nonmember_kind": nonmember_kind,
                "n_members": len(members),
                "n_nonmembers": len(nonmembers),
                "auc": rank_auc(members, nonmembers),
                "tpr_at_1pct_fpr": tpr_at_fpr(members, nonmembers),
            }
        )
    return out


def mia_tables(
    model,
    tokenizer,
    probes,
    variant: str,
    probe_set: str,
    run_id: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    token_stats: list[SuffixTokenStats] | None = None,
) -> tuple[pa.Table, pa.Table | None]:
    """The per-probe ``mia`` table and the ``mia_auc`` table (None without both kinds of probes)."""
    run_id = run_id or new_run_id()
    rows = mia_rows(model, tokenizer, probes, batch_size, progress=progress, token_stats=token_stats)
    per_probe = make_table("mia", rows, variant=variant, probe_set=probe_set, run_id=run_id)
    kinds = {r["kind"] for r in rows}
    if not {"memorized", "control"} <= kinds:
        return per_probe, None
    return per_probe, make_table(
        "mia_auc", auc_rows(rows), variant=variant, probe_set=probe_set, run_id=run_id
    )
