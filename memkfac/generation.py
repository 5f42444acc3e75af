"""Batched greedy continuation with left padding and a KV cache.

Memorization is measured by greedy decoding exactly |suffix| tokens from each prefix. Decoding one
prompt at a time wastes the machine; this decodes a batch at once. Prompts are left-padded so every
row's next token sits in the last column, position ids count real tokens only (a padded row sees the
same positions as the unpadded prompt) and the attention mask hides the padding, so each row's
greedy path is the one it would take alone (tests/test_generation.py checks this).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from memkfac.errors import MemkfacError


def probe_token_ids(probe, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, gold suffix ids) of a probe.

    Token-exact ids are used when the probe carries them (``prefix_ids`` / ``suffix_ids``, as mined
    windows do); otherwise the text is tokenized without special tokens, prefix and suffix apart.
    """
    prompt = (
        probe.prefix_ids if probe.prefix_ids else tokenizer(probe.prefix, add_special_tokens=False).input_ids
    )
    gold = (
        probe.suffix_ids if probe.suffix_ids else tokenizer(probe.suffix, add_special_tokens=False).input_ids
    )
    if not prompt or not gold:
        raise MemkfacError(
            f"probe {probe.id!r} has an empty {'prefix' if not prompt else 'suffix'} after tokenization",
            "give every probe a non-empty prefix and suffix",
        )
    return list(prompt), list(gold)


def model_vocab_size(model) -> int:
    """The token ids a model can read: 0 .. rows of its input embedding - 1."""
    return int(model.get_input_embeddings().num_embeddings)


def probes_token_ids(probes, tokenizer, vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """``probe_token_ids`` of every probe, each id checked to be one the model can read.

    ``vocab_size`` is the model's (``model_vocab_size``, or ``config.vocab_size``). A probe carrying
    ids of another tokenizer would index past the embedding (or score 0% recall by accident), so every
    such probe is named with its line before anything is generated or trained.
    """
    pairs, bad = [], []
    for probe in probes:
        prompt, gold = probe_token_ids(probe, tokenizer)
        outside = sorted({t for t in prompt + gold if not 0 <= t < vocab_size})
        if outside:
            shown = ", ".join(map(str, outside[:5])) + (" ..." if len(outside) > 5 else "")
            bad.append(f"  {probe.location or 'probe'}: probe {probe.id!r} has token id(s) {shown}")
        pairs.append((prompt, gold))
    if bad:
        raise MemkfacError(
            f"{len(bad)} probe(s) hold token ids outside the model's vocabulary (ids 0-{vocab_size - 1}):\n"
            + "\n".join(bad[:20])
            + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""),
            "these ids come from another tokenizer: give the probes as prefix/suffix text, or mine them "
            "again with this model (`memkfac mine`)",
        )
    return pairs


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # any id works: padded positions are masked out


@torch.no_grad()
def _greedy_batch(model, prompts: Sequence[Sequence[int]], n_new: int, pad_id: int) -> torch.Tensor:
    """Greedy-decode ``n_new`` tokens for a batch of prompts. Returns (B, n_new) token ids."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count 0, 1, 2, ... after the padding
    # the model fills the cache in place; transformers renamed the argument past_key_values -> cache in 5.x
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kv = {name: DynamicCache(config=model.config), "use_cache": True}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **kv)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(n_new - 1):
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions, **kv)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1).cpu()


def greedy_continuations(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    batch_size: int = 32,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, exactly ``max_new_tokens`` new tokens each.

    Args:
        prompts: one list of token ids per prompt (no padding; lengths may differ).
        max_new_tokens: one count for all prompts, or one per prompt (e.g. each probe's |suffix|).
            Generation never stops early at an end-of-text token: the count is exact.
        batch_size: prompts decoded together. Prompts are grouped by (new tokens, length) so that a
            batch wastes little on padding; the result is returned in the input order.

    Returns:
        list (one per prompt) of generated token ids, without the prompt.
    """
    counts = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(counts) != len(prompts):
        raise MemkfacError(
            f"got {len(prompts)} prompts but {len(counts)} max_new_tokens values",
            "pass one count for all prompts or exactly one per prompt",
        )
    if any(len(p) == 0 for p in prompts) or any(n < 1 for n in counts):
        raise MemkfacError("every prompt needs at least one token and one new token", "drop empty probes")
    if batch_size < 1:
        raise MemkfacError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch size")
    pad_id = _pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: (counts[i], len(prompts[i])), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc="greedy generation", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            n_new = max(counts[i] for i in rows)
            generated = _greedy_batch(model, [prompts[i] for i in rows], n_new, pad_id)
            for row, i in enumerate(rows):
                results[i] = generated[row, : counts[i]].tolist()
            bar.update(len(rows))
    return results
