"""Forget-set unlearning baselines: gradient ascent with a retain loss (GA+GD) and NPO.

Both train on a forget set (the memorized canaries of split ``sweep``: prefix, then the suffix to
forget) and a retain set (general-text blocks), and, unlike the K-FAC edit, need those labels. Only
the weights of the edited maps train (the MLP ``projections`` of ``layers``, the K-FAC edit's by
default), so the comparison changes the same parameters; everything else is frozen. Losses per step,
with a batch of ``forget_per_batch`` forget sequences and ``retain_per_batch`` retain blocks:

- ``ga_gd`` (gradient difference, e.g. Liu et al. 2022 and the TOFU/OpenUnlearning ``GradDiff``):
      L = -CE_forget + retain_weight * CE_retain
  CE_forget is the mean over forget sequences of the mean next-token cross-entropy of the suffix
  tokens given the prefix; CE_retain the mean token cross-entropy of the retain blocks.
- ``npo`` (Negative Preference Optimization, Zhang, Lin, Bai & Mei 2024, "Negative Preference
  Optimization: From Catastrophic Collapse to Effective Unlearning", eq. 3, plus the retain term of
  their NPO+RT):
      L = -(2 / beta) * mean_forget log sigmoid(-beta * (log p(y|x) - log p_ref(y|x)))
          + retain_weight * CE_retain
  log p(y|x) is the summed log-probability of the suffix y given the prefix x; p_ref is the model
  before unlearning (its log-probabilities are computed once, before the first step, so no second
  model is held). As beta -> 0 the forget term becomes gradient ascent on log p.

AdamW at a constant rate, gradients clipped to ``max_grad_norm``; batches depend only on ``seed`` and
the step, so the model after N steps of a longer run is the model an N-step run gives (what lets
``memkfac compare`` measure a whole strength grid of steps in one run). A non-finite loss stops the
training: ``unlearn`` reports the step, ``train_forget_set`` raises.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import memkfac
from memkfac.arguments import Checks
from memkfac.checkpoint import checkpoint_kind, load_manifest, save_checkpoint
from memkfac.devices import resolve_device
from memkfac.errors import MemkfacError
from memkfac.finetune import collate
from memkfac.fingerprint import model_fingerprint
from memkfac.models import load_model
from memkfac.paths import claim_output
from memkfac.targets import PROJECTIONS, LayerSpec, Projection, check_layers, find_targets, resolve_layers

ForgetSetMethod = Literal["ga_gd", "npo"]
FORGET_SET_METHODS: tuple[ForgetSetMethod, ...] = get_args(ForgetSetMethod)
FORGET_SET = checkpoint_kind("forget_set_unlearning")
Pair = tuple[list[int], list[int]]  # (prefix token ids, suffix token ids)


@dataclass
class ForgetSetArguments:
    """GA+GD or NPO on the edited maps. Defaults by arithmetic, not tuned: 80 steps of 4 + 4
    sequences are the default pipeline's BalancedSubnet step count (5 epochs x 16 steps on the 64
    sweep canaries), so a forget-set variant trains no longer than it; lr 1e-4 with AdamW moves six MLP
    matrices of a 135M model visibly within that many steps; beta 0.1 is NPO's paper value;
    retain_weight 1 is OpenUnlearning's GradDiff/NPO default."""

    layers: LayerSpec  # decoder layers whose MLP maps train; a spec is resolved against the model
    projections: tuple[Projection, ...] = ("gate", "up")
    method: ForgetSetMethod = "ga_gd"
    steps: int = 80  # optimizer steps: the strength
    lr: float = 1e-4
    beta: float = 0.1  # npo only: the inverse temperature of the preference loss
    retain_weight: float = 1.0  # weight of the retain cross-entropy
    forget_per_batch: int = 4
    retain_per_batch: int = 4
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check = Checks()
        check.one_of("method", self.method, FORGET_SET_METHODS)
        with check.field("layers"):
            check_layers(self.layers)
        check.subset("projections", self.projections, PROJECTIONS)
        for name in ("steps", "forget_per_batch", "retain_per_batch"):
            check.at_least(name, getattr(self, name), 1)
        for name in ("lr", "beta", "max_grad_norm"):
            check.positive(name, getattr(self, name))
        check.at_least("retain_weight", self.retain_weight, 0.0)
        check.done()


@dataclass
class UnlearnResult:
    steps: int  # optimizer steps taken
    diverged_at: int | None = None  # the step whose loss was NaN or infinite (it was not applied)
    history: list[dict] = field(default_factory=list)  # per step: loss, forget and retain terms


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2 / beta) * mean log sigmoid(-beta * (logp - logp_ref)); ``logp`` (B,) sequence log-probs."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def _nll(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int):
    """``(summed NLL, predicted tokens)``, each (B,): the targets at positions >= ``starts[b]``."""
    batch = collate(sequences, pad_id, starts)
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(1), (labels != -100).sum(1)


def suffix_logprobs(model, pairs: Sequence[Pair], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """(n,) float: log p(suffix | prefix) summed over the suffix tokens, without gradient."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            nll, _ = _nll(model, [p + s for p, s in chunk], [len(p) for p, _ in chunk], pad_id)
            out.append(-nll.cpu())
    return torch.cat(out)


def _check_data(method: str, forget: Sequence[Pair], retain: Sequence[Sequence[int]]) -> None:
    if not forget or not retain or any(not p or not s for p, s in forget) or min(map(len, retain)) < 2:
        raise MemkfacError(
            f"method {method!r} trains on a forget set and retain text, but got {len(forget)} forget "
            "pairs (memorized canaries of split sweep, each with a prefix and a suffix) and "
            f"{len(retain)} retain sequences (general text of at least 2 tokens)",
            "give it the canary probe set (memorized probes in split sweep) and the corpus's finetune split",
        )


def unlearn(
    model,
    forget: Sequence[Pair],
    retain: Sequence[Sequence[int]],
    args: ForgetSetArguments,
    pad_id: int,
    progress: bool = False,
    after_step: Callable[[int], bool | None] | None = None,
) -> UnlearnResult:
    """Train the ``args`` targets of ``model`` in place for ``args.steps`` steps; stop at a NaN loss.

    ``after_step(n)`` runs after step n with the model in eval mode and no gradient; returning True
    stops the training there. The model is left in eval mode with every parameter's ``requires_grad``
    set back to True.
    """
    _check_data(args.method, forget, retain)
    targets = find_targets(model, args.layers, args.projections)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [model.get_submodule(t.name).weight for t in targets]
    for p in params:
        p.requires_grad_(True)
    logp_ref = suffix_logprobs(model, forget, pad_id) if args.method == "npo" else None
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    orders: dict[str, list[int]] = {"forget": [], "retain": []}

    def draw(name: str, pool_size: int, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if not orders[name]:
                orders[name] = rng.sample(range(pool_size), pool_size)
            picked.append(orders[name].pop())
        return picked

    result = UnlearnResult(steps=0)
    model.train()
    try:
        for step in tqdm(range(1, args.steps + 1), desc=args.method, unit="step", disable=not progress):
            f_idx = draw("forget", len(forget), min(args.forget_per_batch, len(forget)))
            r_idx = draw("retain", len(retain), args.retain_per_batch)
            chunk = [forget[i] for i in f_idx]
            f_nll, f_n = _nll(model, [p + s for p, s in chunk], [len(p) for p, _ in chunk], pad_id)
            r_nll, r_n = _nll(model, [retain[i] for i in r_idx], [0] * len(r_idx), pad_id)
            retain_ce = r_nll.sum() / r_n.sum()
            if args.method == "ga_gd":
                forget_term = -(f_nll / f_n).mean()
            else:
                forget_term = npo_loss(-f_nll, logp_ref[f_idx].to(f_nll.device), args.beta)
            loss = forget_term + args.retain_weight * retain_ce
            if not math.isfinite(loss.item()):
                result.diverged_at = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            result.steps = step
            result.history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "forget": forget_term.item(),
                    "retain_ce": retain_ce.item(),
                }
            )
            if after_step is not None:
                model.eval()
                with torch.no_grad():
                    stop = after_step(step)
                if stop is True:
                    break
                model.train()
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    return result


def train_forget_set(
    model_dir: Path,
    forget: Sequence[Pair],
    retain: Sequence[Sequence[int]],
    args: ForgetSetArguments,
    out_dir: Path,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Unlearn ``forget`` from ``model_dir`` (``args.method``), save to ``out_dir``; return the manifest.

    ``forget``: (prefix ids, suffix ids) of the sequences to unlearn; ``retain``: token ids of general
    text. Raises ``MemkfacError`` without writing anything when the loss becomes NaN or infinite.
    ``out_dir`` must be new, empty or, with ``overwrite``, an earlier checkpoint of this kind.
    """
    _check_data(args.method, forget, retain)
    device = resolve_device(device)
    with claim_output(out_dir, FORGET_SET, overwrite=overwrite, inputs=[model_dir]):
        start = time.perf_counter()
        model, tokenizer = load_model(model_dir, device=device)
        args = resolve_layers(args, model.config.num_hidden_layers)
        pad_id = tokenizer.pad_token_id or 0
        result = unlearn(model, forget, retain, args, pad_id, progress)
        if result.diverged_at is not None:
            raise MemkfacError(
                f"{args.method} diverged at step {result.diverged_at} (the loss became NaN or infinite)",
                "lower lr or steps",
            )
        manifest = {
            "kind": "forget_set_unlearning",
            "memkfac_version": memkfac.__version__,
            "base_model": {"dir": str(model_dir), "fingerprint": model_fingerprint(model_dir)},
            "arguments": asdict(args),
            "n_forget": len(forget),
            "n_retain": len(retain),
            "history": result.history,
            "train_seconds": round(time.perf_counter() - start, 3),
        }
        save_checkpoint(model, tokenizer, out_dir, manifest, overwrite=overwrite, inputs=[model_dir])
        return load_manifest(out_dir)
