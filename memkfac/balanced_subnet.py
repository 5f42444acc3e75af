"""The BalancedSubnet baseline (Sakarvadia et al., ICLR 2025): a learned sparse mask over MLP weights.

Each masked weight W (d_out, d_in) gets a real-valued score tensor S of its shape (kaiming-uniform,
as in edge-popup). The forward pass uses W * M with M = 0 on the ``ratio`` fraction of entries with
the smallest |S| and 1 elsewhere; a straight-through estimator passes the gradient of M to |S|. The
weights stay frozen; SGD trains the scores on

    L = -(1 - alpha) * CE(forget batch) + alpha * CE(retain batch)

so loss rises on the memorized sequences and stays low on general text. Every batch holds both sides
(stratified), so neither mean is over an empty set. At the end the mask is baked in (W <- W * M), the
scores are dropped, and the checkpoint is written like the K-FAC edit (HF directory plus manifest).

Defaults and why (the paper's best OLMo-2-7B setting is alpha 0.7, ratio 0.0015, lr 0.3, 5 epochs over
a 500-sequence forget set):
- alpha 0.7, lr 0.3, SGD momentum 0.9, weight decay 5e-4: kept as in the paper and the BSN code.
- ratio 0.01 per matrix instead of 0.0015: a SmolLM2-135M MLP matrix (576 x 1536) has 51x fewer entries
  than an OLMo-2-7B one (4096 x 11008), so 0.0015 would prune ~1.3k weights per matrix; 1% (~8.8k) is
  inside the paper's search range [0.001, 0.05] and nearer the absolute count it pruned.
- 20 epochs instead of 5: 5 epochs over the paper's 500 sequences are a few hundred steps; the default
  canary forget set (the sweep split) has 32-64 sequences, so 20 epochs at 4 forget sequences per step
  give 160-320 steps, the same order.
These were chosen by that arithmetic, not tuned; sweep ratio and alpha and compare at matched perplexity.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import memkfac
from memkfac.arguments import BSNArguments
from memkfac.checkpoint import checkpoint_kind, load_manifest, save_checkpoint
from memkfac.devices import resolve_device
from memkfac.errors import MemkfacError
from memkfac.fingerprint import model_fingerprint
from memkfac.models import load_model
from memkfac.paths import claim_output
from memkfac.targets import find_targets, resolve_layers

# The before/after retain CE in the manifest is a diagnostic, so it is measured on the first this many
# retain blocks: over a whole finetune split (512 blocks) it took half of a CPU run.
RETAIN_LOSS_BLOCKS = 64
BSN_CHECKPOINT = checkpoint_kind("balanced_subnet")


class _ScoreMask(nn.Module):
    """Parametrization W -> W * M(S); M zeroes the k entries of smallest |S|; straight-through gradient."""

    def __init__(self, weight: torch.Tensor, ratio: float):
        super().__init__()
        self.scores = nn.Parameter(torch.empty_like(weight, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))  # nn.Linear's weight init, as in edge-popup
        self.k = round(ratio * weight.numel())

    def mask(self) -> torch.Tensor:
        """(d_out, d_in) 0/1 mask with exactly ``k`` zeros (topk, not a full sort)."""
        flat = torch.ones(self.scores.numel(), device=self.scores.device)
        if self.k:
            flat[torch.topk(self.scores.detach().abs().flatten(), self.k, largest=False).indices] = 0
        return flat.view_as(self.scores)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        magnitude = self.scores.abs()
        ste = self.mask() + magnitude - magnitude.detach()  # value: the mask; gradient: d/d|S| = 1
        return weight * ste.to(weight.dtype)


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T) ids and a (B, T) attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    return ids, attention


def sequence_losses(model, sequences: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence (nats per predicted token), padding ignored."""
    ids, attention = _pad(sequences, pad_id)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
    targets, valid = ids[:, 1:].to(device), attention[:, 1:].to(device).float()
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return (nll * valid).sum(1) / valid.sum(1).clamp_min(1)


@torch.no_grad()
def mean_loss(model, sequences: list[list[int]], batch_size: int = 8, pad_id: int = 0) -> float:
    """Mean over sequences of the per-sequence mean cross-entropy."""
    losses = [
        sequence_losses(model, sequences[i : i + batch_size], pad_id)
        for i in range(0, len(sequences), batch_size)
    ]
    return torch.cat(losses).mean().item()


def _objective(losses: torch.Tensor, n_forget: int, alpha: float) -> torch.Tensor:
    """-(1 - alpha) * mean forget CE + alpha * mean retain CE; an empty side contributes 0, never NaN."""
    forget, retain = losses[:n_forget], losses[n_forget:]
    total = losses.new_zeros(())
    if forget.numel():
        total = total - (1 - alpha) * forget.mean()
    if retain.numel():
        total = total + alpha * retain.mean()
    return total


def train_balanced_subnet(
    model_dir: Path,
    forget: list[list[int]],
    retain: list[list[int]],
    args: BSNArguments,
    out_dir: Path,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Train a BalancedSubnet mask on ``model_dir``, bake it in, save to ``out_dir``; return the manifest.

    forget: token ids of the memorized sequences to unlearn (prefix + suffix); retain: token ids of
    general text blocks. Scores are fp32 and the only trainable tensors. ``device``: where the model
    and the scores live (checked before anything runs). ``out_dir`` must be new, empty or, with
    ``overwrite``, an earlier BalancedSubnet checkpoint, and may not overlap ``model_dir``; it is locked
    from the first step.
    """
    device = resolve_device(device)
    with claim_output(out_dir, BSN_CHECKPOINT, overwrite=overwrite, inputs=[model_dir]):
        return _train_balanced_subnet(model_dir, forget, retain, args, out_dir, progress, overwrite, device)


def _train_balanced_subnet(
    model_dir: Path,
    forget: list[list[int]],
    retain: list[list[int]],
    args: BSNArguments,
    out_dir: Path,
    progress: bool,
    overwrite: bool,
    device: torch.device,
) -> dict:
    """The body of ``train_balanced_subnet``, run holding the output's claim."""
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not forget or not retain or min(map(len, forget + retain)) < 2:
        raise MemkfacError(
            f"BalancedSubnet needs forget and retain sequences of >= 2 tokens (got {len(forget)} "
            f"forget, {len(retain)} retain)",
            "pass the sweep split of a memorized probe set and general text blocks",
        )
    model, tokenizer = load_model(model_dir, device=device)
    args = resolve_layers(args, model.config.num_hidden_layers)
    pad_id = tokenizer.pad_token_id or 0
    for p in model.parameters():
        p.requires_grad_(False)
    targets = find_targets(model, args.layers, args.projections)
    retain_sample = retain[:RETAIN_LOSS_BLOCKS]
    forget_before, retain_before = (
        mean_loss(model, forget, pad_id=pad_id),
        mean_loss(model, retain_sample, pad_id=pad_id),
    )

    torch.manual_seed(args.seed)
    masks = {}
    for target in targets:
        module = model.get_submodule(target.name)
        masks[target.name] = _ScoreMask(module.weight, args.ratio).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", masks[target.name])
    scores = [m.scores for m in masks.values()]
    optimizer = torch.optim.SGD(scores, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    rng = random.Random(args.seed)
    retain_order: list[int] = []
    history = []
    steps_per_epoch = math.ceil(len(forget) / args.forget_per_batch)
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="BalancedSubnet", unit="step", disable=not progress)
    for epoch in range(args.epochs):
        forget_order = rng.sample(range(len(forget)), len(forget))
        sums = torch.zeros(3, dtype=torch.float64)  # forget CE, retain CE, objective, summed over steps
        for step in range(steps_per_epoch):
            batch_forget = [
                forget[i] for i in forget_order[step * args.forget_per_batch :][: args.forget_per_batch]
            ]
            batch_retain = []
            while len(batch_retain) < args.retain_per_batch:  # stratified: every step sees retain text too
                if not retain_order:
                    retain_order = rng.sample(range(len(retain)), len(retain))
                batch_retain.append(retain[retain_order.pop()])
            losses = sequence_losses(model, batch_forget + batch_retain, pad_id)
            objective = _objective(losses, len(batch_forget), args.loss_weight)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            sums += torch.tensor(
                [
                    losses[: len(batch_forget)].mean().item(),
                    losses[len(batch_forget) :].mean().item(),
                    objective.item(),
                ],
                dtype=torch.float64,
            )
            bar.update()
        mean = (sums / steps_per_epoch).tolist()
        history.append({"epoch": epoch, "forget_ce": mean[0], "retain_ce": mean[1], "objective": mean[2]})
        bar.set_postfix(forget=f"{mean[0]:.3f}", retain=f"{mean[1]:.3f}")
    bar.close()

    modules = []
    with torch.no_grad():
        for target in targets:
            module = model.get_submodule(target.name)
            mask = masks[target.name].mask()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.mul_(mask.to(module.weight.dtype))  # bake in: W <- W * M; the scores are dropped
            n_pruned = int((mask == 0).sum())
            modules.append(
                {
                    "name": target.name,
                    "layer": target.layer,
                    "proj": target.proj,
                    "numel": mask.numel(),
                    "n_pruned": n_pruned,
                    "fraction_pruned": n_pruned / mask.numel(),
                }
            )
    numel, pruned = sum(m["numel"] for m in modules), sum(m["n_pruned"] for m in modules)
    manifest = {
        "kind": "balanced_subnet",
        "memkfac_version": memkfac.__version__,
        "base_model": {"dir": str(model_dir), "fingerprint": model_fingerprint(model_dir)},
        "arguments": asdict(args),
        "targets": [t.to_json() for t in targets],
        "modules": modules,
        "n_pruned": pruned,
        "fraction_pruned": pruned / numel,
        "n_forget": len(forget),
        "n_retain": len(retain),
        "losses": {
            "forget_before": forget_before,
            "forget_after": mean_loss(model, forget, pad_id=pad_id),
            "retain_before": retain_before,
            "retain_after": mean_loss(model, retain_sample, pad_id=pad_id),
            "retain_sequences": len(retain_sample),
        },
        "history": history,
        "train_seconds": round(time.perf_counter() - start, 3),
    }
    save_checkpoint(model, tokenizer, out_dir, manifest, overwrite=overwrite, inputs=[model_dir])
    return load_manifest(out_dir)
