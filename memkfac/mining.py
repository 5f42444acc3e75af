"""Mining memorized sequences with the paper's criterion: teacher-forced argmax equals the gold suffix.

A candidate is a prefix P and a suffix S of token ids. It is memorized when, feeding prefix + suffix
once (teacher forcing), the argmax prediction at every suffix position equals the gold token; that
is exactly greedy decoding reproducing the suffix, found with one batched forward and no generation.

Candidates come from any text:
- window mode (default): windows of ``prefix_len`` + ``suffix_len`` tokens (64 + 48, as the paper)
  starting every ``stride`` tokens of each document;
- quotes mode: each text is one candidate whose last ``quote_suffix_len`` (8) tokens are the suffix.

Memorized windows are then de-duplicated (a window is dropped when the Jaccard similarity of its
suffix token n-grams with an already kept window reaches ``dedup_threshold``; the paper's files
suggest 0.7), assigned to the sweep or holdout split by a hash of their suffix, and returned as
token-exact probes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from memkfac.arguments import MineArguments
from memkfac.errors import MemkfacError
from memkfac.finetune import collate
from memkfac.probes import Probe


@dataclass(frozen=True)
class Candidate:
    doc: int  # index of the text it came from
    start: int  # token offset of the prefix in that text
    prefix_ids: list[int]
    suffix_ids: list[int]


def candidates(docs: Iterable[Sequence[int]], config: MineArguments) -> list[Candidate]:
    """Cut token-id documents into candidates (windows, or one per text in quotes mode)."""
    out = []
    for d, ids in enumerate(docs):
        ids = list(ids)
        if config.quotes:
            if len(ids) > config.quote_suffix_len:
                cut = len(ids) - config.quote_suffix_len
                out.append(Candidate(d, 0, ids[:cut], ids[cut:]))
            continue
        width = config.prefix_len + config.suffix_len
        for start in range(0, len(ids) - width + 1, config.stride or width):
            cut = start + config.prefix_len
            out.append(Candidate(d, start, ids[start:cut], ids[cut : start + width]))
    return out


@torch.no_grad()
def memorized_mask(
    model, cands: Sequence[Candidate], batch_size: int = 16, progress: bool = True
) -> list[bool]:
    """For each candidate: does the teacher-forced argmax equal the gold token at every suffix position?"""
    device = next(model.parameters()).device
    keep: list[bool] = []
    for start in tqdm(range(0, len(cands), batch_size), desc="mining", unit="batch", disable=not progress):
        batch = cands[start : start + batch_size]
        ids = collate([c.prefix_ids + c.suffix_ids for c in batch], pad_id=0)
        logits = model(
            input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device)
        ).logits
        pred = logits.argmax(-1).cpu()  # (B, T): the prediction for the token after each position
        for row, c in enumerate(batch):
            p, s = len(c.prefix_ids), len(c.suffix_ids)
            keep.append(bool((pred[row, p - 1 : p + s - 1] == torch.tensor(c.suffix_ids)).all()))
    return keep


def _ngrams(ids: Sequence[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for i in range(max(1, len(ids) - n + 1))}


def deduplicate(cands: Sequence[Candidate], ngram: int = 3, threshold: float = 0.7) -> list[Candidate]:
    """Keep candidates in order, dropping one whose suffix n-gram Jaccard with a kept one is >= threshold."""
    kept: list[tuple[Candidate, set]] = []
    for c in cands:
        grams = _ngrams(c.suffix_ids, ngram)
        if all(len(grams & g) / len(grams | g) < threshold for _, g in kept):
            kept.append((c, grams))
    return [c for c, _ in kept]


def _split(c: Candidate, sweep_fraction: float) -> str:
    digest = hashlib.sha256(",".join(map(str, c.suffix_ids)).encode()).hexdigest()
    return "sweep" if int(digest[:16], 16) / 2**64 < sweep_fraction else "holdout"


def mine(
    model,
    tokenizer,
    texts: Iterable[str],
    config: MineArguments | None = None,
    source: str = "",
    progress: bool = True,
) -> tuple[list[Probe], dict]:
    """Find memorized candidates in ``texts``.

    Returns the de-duplicated token-exact probes and counts: ``{"texts", "candidates", "memorized", "kept"}``.
    """
    config = config or MineArguments()
    if config.prefix_len < 1 or config.suffix_len < 1 or config.quote_suffix_len < 1 or config.batch_size < 1:
        raise MemkfacError(f"invalid mining configuration {config}", "use positive lengths and batch size")
    docs = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    cands = candidates(docs, config)
    if not cands:
        raise MemkfacError(
            "no candidate windows: every text is shorter than one window",
            "use longer texts, shorter --prefix-len/--suffix-len, or --quotes",
        )
    hits = [
        c
        for c, ok in zip(cands, memorized_mask(model, cands, config.batch_size, progress), strict=True)
        if ok
    ]
    kind = config.kind or ("quote" if config.quotes else "memorized")
    kept = deduplicate(hits, config.dedup_ngram, config.dedup_threshold)
    probes = [
        Probe(
            id=f"d{c.doc}-t{c.start}",
            prefix=tokenizer.decode(c.prefix_ids),
            suffix=tokenizer.decode(c.suffix_ids),
            kind=kind,
            source=source,
            split=_split(c, config.sweep_fraction),
            prefix_ids=c.prefix_ids,
            suffix_ids=c.suffix_ids,
        )
        for c in kept
    ]
    return probes, {"texts": len(docs), "candidates": len(cands), "memorized": len(hits), "kept": len(kept)}
