"""Utility after an edit: held-out perplexity and nDCG@10 agreement with the unedited model.

Perplexity = exp(total token NLL / total predicted tokens) over held-out blocks, from exact sums.
The official code instead averages exp(mean batch loss) over batches; that variant is reported next
to it as ``perplexity_batch_mean`` (it depends on the batch size and is >= the exact value by Jensen).

nDCG@k (paper App. C): at every held-out position the unedited reference model's top-k next tokens
B_t are the relevant set and the edited model's top-k list is ranked against it.
- paper formula: rel(r) = k - r + 1 if the edited model's r-th token is in B_t, else 0;
  DCG = sum_r rel(r) / log2(r + 1), normalised by IDCG = sum_r (k - r + 1) / log2(r + 1). Any
  reordering of B_t scores 1.0.
- official code: rel = k - (the token's rank in B_t) + 1, discounted at the edited rank, so
  reordering is penalised too. Reported as ``ndcg_official``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memkfac.errors import MemkfacError


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise MemkfacError(
            f"held-out blocks must be (n_blocks, block_len >= 2) token ids, got shape {tuple(blocks.shape)}",
            "pass corpora.load_split(corpus_dir, 'heldout')",
        )


@torch.no_grad()
def heldout_pass(
    model, blocks: torch.Tensor, batch_size: int = 8, k: int = 0, progress: bool = True
) -> tuple[dict, torch.Tensor | None]:
    """One forward pass over packed held-out blocks (n_blocks, block_len): perplexity, and when ``k`` > 0
    each position's top-k next-token ids, so an edited model's utility costs one pass, not two.

    Returns ``(row, topk)``: ``row`` holds the ``perplexity`` table's measured columns: n_blocks,
    block_len, n_tokens, mean_nll (nats/token), perplexity = exp(mean_nll), perplexity_batch_mean
    (official variant), batch_size; ``topk`` is (n_blocks, block_len, k) int64, best first (None when
    ``k`` is 0). Every position but the last is predicted for perplexity.
    """
    _check_blocks(blocks)
    device = next(model.parameters()).device
    total_nll, total_tokens, batch_ppls, topk = 0.0, 0, [], []
    for start in tqdm(range(0, len(blocks), batch_size), desc="held-out pass", disable=not progress):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits
        if k:
            topk.append(logits.topk(k, dim=-1).indices.cpu())
        predicted = logits[:, :-1].float()
        nll = F.cross_entropy(
            predicted.reshape(-1, predicted.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n = ids[:, 1:].numel()
        total_nll += nll
        total_tokens += n
        batch_ppls.append(math.exp(nll / n))
    mean_nll = total_nll / total_tokens
    row = {
        "n_blocks": len(blocks),
        "block_len": blocks.shape[1],
        "n_tokens": total_tokens,
        "mean_nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "perplexity_batch_mean": sum(batch_ppls) / len(batch_ppls),
        "batch_size": batch_size,
    }
    return row, torch.cat(topk) if k else None


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = True) -> dict:
    """The ``perplexity`` row of ``heldout_pass`` (n_blocks, block_len, n_tokens, mean_nll,
    perplexity, perplexity_batch_mean, batch_size)."""
    return heldout_pass(model, blocks, batch_size, 0, progress)[0]


def topk_lists(
    model, blocks: torch.Tensor, k: int = 10, batch_size: int = 8, progress: bool = True
) -> torch.Tensor:
    """Each position's top-k next-token ids, best first: (n_blocks, block_len, k) int64."""
    return heldout_pass(model, blocks, batch_size, k, progress)[1]


def ndcg_from_lists(edited: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean nDCG@k of edited top-k lists against reference lists, both (..., k) token ids.

    Returns {"ndcg": paper formula, "ndcg_official": official code's variant, "n_positions", "k"}.
    """
    if edited.shape != reference.shape:
        raise MemkfacError(
            f"top-k lists differ in shape: edited {tuple(edited.shape)}, reference {tuple(reference.shape)}",
            "compute both on the same held-out blocks with the same k",
        )
    k = edited.shape[-1]
    edited, reference = edited.reshape(-1, k), reference.reshape(-1, k)
    match = edited[:, :, None] == reference[:, None, :]  # (N, k_edited, k_reference)
    in_reference = match.any(-1)  # (N, k)
    reference_rank = match.int().argmax(-1)  # 0-based rank in B_t where present
    rank = torch.arange(k)  # 0-based edited rank r - 1
    discount = 1.0 / torch.log2(rank.double() + 2)
    idcg = ((k - rank) * discount).sum()
    paper = (in_reference * (k - rank) * discount).sum(-1) / idcg
    official = (in_reference * (k - reference_rank) * discount).sum(-1) / idcg
    return {
        "ndcg": paper.mean().item(),
        "ndcg_official": official.mean().item(),
        "n_positions": len(edited),
        "k": k,
    }


def ndcg(
    model, blocks: torch.Tensor, reference_topk: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> dict:
    """nDCG@k of ``model`` on ``blocks`` against the reference model's ``topk_lists`` on the same blocks."""
    edited = topk_lists(model, blocks, reference_topk.shape[-1], batch_size, progress)
    return ndcg_from_lists(edited, reference_topk)
