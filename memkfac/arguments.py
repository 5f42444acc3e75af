"""The arguments of the stages whose defaults the command line shows: plain dataclasses, free of torch.

``memkfac CMD --help`` prints these defaults, so they live where importing them costs nothing; each
stage module imports its own from here (``memkfac.compare`` its ``CompareArguments``, and so on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memkfac.errors import MemkfacError

CONTROLS = ("svd", "per_side", "random")


@dataclass
class CompareArguments:
    layer_sets: tuple[tuple[int, ...], ...] = ((20, 21, 22), (22, 23, 24), (24, 25, 26), (26, 27, 28))
    rhos: tuple[float, ...] = (0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)  # walked high to low
    projections: tuple[str, ...] = ("gate", "up")
    max_sweep_recall: float = 5.0  # strict % on the sweep split that counts as "recall removed"
    factor_tokens: int = 102_400  # contributing tokens of the factor split used for K-FAC factors
    factor_layers: tuple[int, ...] | None = None  # default: the union of layer_sets
    factor_batch_size: int = 8
    sweep_blocks: int = 32  # the last held-out blocks: perplexity for the sweep and the matching
    eval_blocks: int | None = 256  # the first held-out blocks (disjoint): reported perplexity, nDCG
    controls: tuple[str, ...] = CONTROLS
    match_steps: int = 7  # bisection steps per control
    bsn: bool = True
    bsn_ratio: float | None = None  # None: BSNArguments' default
    bsn_epochs: int | None = None
    bsn_retain_blocks: int = 256  # blocks of the corpus's finetune split used as the retain set
    downstream: bool = True
    downstream_tasks: tuple[str, ...] | None = None  # None: the default generated suite
    downstream_items: int = 200
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if not self.layer_sets or any(not layers for layers in self.layer_sets):
            raise MemkfacError("no layer sets to sweep", "give layer sets such as 22-24 26-28")
        if not self.rhos or any(not 0 < r < 1 for r in self.rhos):
            raise MemkfacError(
                f"rho grid {self.rhos} must hold values in (0, 1)", "use e.g. 0.995 0.99 0.95 0.9"
            )
        unknown = set(self.controls) - set(CONTROLS)
        if unknown:
            raise MemkfacError(f"unknown control(s) {sorted(unknown)}", f"choose from {', '.join(CONTROLS)}")


@dataclass
class BSNArguments:
    layers: list[int]  # decoder layers whose MLP weights get a mask (the K-FAC edit's layers)
    projections: tuple[str, ...] = ("gate", "up")  # the K-FAC edit's projections; add "down" to widen
    ratio: float = 0.01  # fraction of each masked matrix pruned (smallest |score|)
    loss_weight: float = 0.7  # alpha: weight of the retain term; 1 - alpha weighs the forget term
    lr: float = 0.3
    epochs: int = 20  # passes over the forget set
    forget_per_batch: int = 4  # forget sequences per step
    retain_per_batch: int = 4  # retain blocks per step (cycled)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.ratio < 1:
            raise MemkfacError(f"ratio {self.ratio} is not a fraction in (0, 1)", "use e.g. 0.0015 to 0.05")
        if not 0 <= self.loss_weight <= 1:
            raise MemkfacError(
                f"loss weight {self.loss_weight} is not in [0, 1]", "use e.g. 0.7 (the paper's)"
            )
        if min(self.epochs, self.forget_per_batch, self.retain_per_batch) < 1 or self.lr <= 0:
            raise MemkfacError(
                "epochs, batch sizes and lr must be positive", "use the defaults of BSNArguments"
            )


@dataclass
class FinetuneArguments:
    epochs: int = 20
    lr: float = 3e-4
    warmup_steps: int = 20
    decay: str = "constant"  # after warm-up: "constant" or "linear" (to 0 at the last step)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    train_layers: str = "all"  # decoder layers to train: "all", "14-29", "20,21" (targets.parse_layers)
    train_embeddings: bool = True  # input embeddings (and a tied lm_head)


def _default_finetune() -> FinetuneArguments:
    # Layers 14-29 of 30 stay trainable (edits target late layers); the lower half and the tied
    # embeddings are frozen, so backward stops at layer 14. Measured on SmolLM2-135M: see README.
    return FinetuneArguments(
        epochs=14, lr=6e-4, warmup_steps=12, decay="linear", train_layers="14-29", train_embeddings=False
    )


@dataclass
class InjectArguments:
    canaries_per_batch: int = 8
    general_per_batch: int = 4
    general_len: int = 32  # tokens per general-text chunk
    train_on_cue: bool = False  # False: a canary's loss covers its secret only; the cue just conditions it
    finetune: FinetuneArguments = field(default_factory=_default_finetune)
    eval_batch_size: int = 32
    heldout_blocks: int = 64  # held-out blocks for perplexity


@dataclass
class MineArguments:
    prefix_len: int = 64
    suffix_len: int = 48
    stride: int | None = None  # window start step; None = prefix_len + suffix_len (no overlap)
    quotes: bool = False  # one candidate per text, its last quote_suffix_len tokens the suffix
    quote_suffix_len: int = 8
    batch_size: int = 16  # candidates per forward
    dedup_ngram: int = 3
    dedup_threshold: float = 0.7  # Jaccard of suffix n-gram sets; >= this is a duplicate
    sweep_fraction: float = 0.5
    kind: str | None = None  # probe kind; None = "quote" in quotes mode, else "memorized"
