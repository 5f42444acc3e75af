"""A small full fine-tuning loop: AdamW, linear warm-up then a constant or linearly decaying rate, fp32.

Canary injection and resurgence fine-tunes share it. Data comes as an epoch plan: a function from
the epoch number to that epoch's batches, so callers decide the mix (``mixed_batches`` draws each
batch from several pools, e.g. 8 canaries + 4 general-text chunks, reshuffled every epoch).
Parts of the model can be frozen (embeddings, lower layers): backward then stops at the lowest
trainable layer, which is what makes CPU fine-tuning of a 135M model affordable.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from memkfac.arguments import FinetuneArguments
from memkfac.errors import MemkfacError
from memkfac.targets import parse_layers

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (batch, seq_len)
EpochPlan = Callable[[int], list[Batch]]


@dataclass
class FinetuneStats:
    steps: int
    tokens: int  # non-padding tokens trained on
    seconds: float
    trainable_params: int
    losses: list[float] = field(default_factory=list)  # mean token loss per step
    lrs: list[float] = field(default_factory=list)  # learning rate of each step


def collate(
    sequences: Sequence[Sequence[int]], pad_id: int, loss_starts: Sequence[int] | None = None
) -> Batch:
    """Right-pad token sequences into a batch; padding is masked out of attention and loss.

    ``loss_starts[i]`` (optional): the first position of sequence ``i`` that is a training target; the
    tokens before it (e.g. a canary's cue) only condition the prediction.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for row, start in enumerate(loss_starts or []):
        labels[row, :start] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mixed_batches(
    pools: Sequence[tuple[Sequence[Sequence[int]], int]],
    pad_id: int,
    seed: int = 0,
    loss_starts: Sequence[int] | None = None,
) -> EpochPlan:
    """An epoch plan drawing ``per_batch`` sequences from each ``(pool, per_batch)`` into every batch.

    The first pool sets the epoch: every one of its sequences is seen once per epoch (one batch may
    be smaller); its batches group sequences of similar length. The other pools are cycled through
    in a shuffled order. Shuffles depend only on ``seed`` and the epoch, so a run is reproducible.
    ``loss_starts`` (optional, one per sequence of the first pool): see ``collate``; the other pools'
    sequences are trained on every token.
    """
    if not pools or not pools[0][0] or any(n < 1 for _, n in pools):
        raise MemkfacError("mixed_batches needs a non-empty first pool and per_batch >= 1", "check the data")
    cursors = [0] * len(pools)
    orders: list[list[int]] = [[] for _ in pools]

    def take(k: int, n: int, gen: torch.Generator) -> list[Sequence[int]]:
        pool = pools[k][0]
        out = []
        for _ in range(n):
            if cursors[k] >= len(orders[k]):
                orders[k], cursors[k] = torch.randperm(len(pool), generator=gen).tolist(), 0
            out.append(pool[orders[k][cursors[k]]])
            cursors[k] += 1
        return out

    def plan(epoch: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        first, n_first = pools[0]
        order = torch.randperm(len(first), generator=gen).tolist()
        # Sort windows of 4 batches by length so a batch holds similar lengths (less padding), then
        # shuffle the batch order.
        window = 4 * n_first
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda i: len(first[i]))
        ]
        groups = [order[start : start + n_first] for start in range(0, len(order), n_first)]
        batches = []
        for g in torch.randperm(len(groups), generator=gen).tolist():
            seqs = [first[i] for i in groups[g]]
            starts = [loss_starts[i] for i in groups[g]] if loss_starts is not None else [0] * len(seqs)
            for k in range(1, len(pools)):
                seqs += take(k, pools[k][1], gen)
            batches.append(collate(seqs, pad_id, starts + [0] * (len(seqs) - len(starts))))
        return batches

    return plan


_LAYER_PARAM = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def set_trainable(model, config: FinetuneArguments) -> int:
    """Freeze what ``config`` leaves out; return the number of trainable parameters."""
    keep = set(parse_layers(config.train_layers, model.config.num_hidden_layers))
    for name, p in model.named_parameters():
        layer = _LAYER_PARAM.search(name)
        p.requires_grad_(layer is None or int(layer.group(1)) in keep)
    if not config.train_embeddings:
        model.get_input_embeddings().requires_grad_(False)  # a tied lm_head shares this weight
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finetune(
    model,
    plan: EpochPlan,
    config: FinetuneArguments,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> FinetuneStats:
    """Train ``model`` in place on ``plan(epoch)`` for each epoch; return per-step losses and totals.

    ``after_step(n)`` is called after the n-th optimizer step (n from 1), with the model in eval mode
    and no gradient, to measure checkpoints of one run (its time is not in ``stats.seconds``). The
    model is left in eval mode with every parameter's ``requires_grad`` set back to True.
    """
    torch.manual_seed(config.seed)
    n_trainable = set_trainable(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    # one kernel over the weights: on CPU a quarter of the default (foreach) update's time
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    first_epoch = plan(0)
    total = max(1, len(first_epoch) * config.epochs)  # mixed_batches epochs all have the same length

    def rate(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        if config.decay == "linear" and step >= config.warmup_steps:
            return max(0.0, (total - step) / max(1, total - config.warmup_steps))
        return warm

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    stats = FinetuneStats(steps=0, tokens=0, seconds=0.0, trainable_params=n_trainable)
    start = time.perf_counter()
    model.train()
    try:
        with tqdm(total=config.epochs, desc="fine-tuning", unit="epoch", disable=not progress) as bar:
            for epoch in range(config.epochs):
                for batch in first_epoch if epoch == 0 else plan(epoch):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    loss = model(**batch).loss
                    if not math.isfinite(loss.item()):
                        raise MemkfacError(
                            f"fine-tuning diverged at step {stats.steps} (loss {loss.item()})",
                            "lower the learning rate or lengthen the warm-up",
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    stats.lrs.append(optimizer.param_groups[0]["lr"])
                    optimizer.step()
                    schedule.step()
                    stats.steps += 1
                    stats.tokens += int(batch["attention_mask"].sum())
                    stats.losses.append(loss.item())
                    if after_step is not None:
                        paused = time.perf_counter()
                        model.eval()
                        with torch.no_grad():
                            after_step(stats.steps)
                        model.train()
                        start += time.perf_counter() - paused  # stats.seconds times training only
                    bar.set_postfix(step=stats.steps, loss=f"{loss.item():.3f}")
                bar.update(1)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    stats.seconds = time.perf_counter() - start
    return stats
