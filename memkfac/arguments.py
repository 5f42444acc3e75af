"""The arguments of the stages and how they check themselves: each bound written once, in ``__post_init__``.

A dataclass collects what is wrong with each of its fields in a ``Checks`` and raises one
``ArgumentError`` naming them all. The command line prints it like any ``MemkfacError``; the pipeline
config (``resources/config.py``) reports each problem under its key path (``injection.finetune.epochs``),
because ``ArgumentError`` is also a ``ValueError``, which validators such as pydantic's collect.

The arguments whose defaults ``memkfac CMD --help`` prints live here, free of torch, so the command line
starts at once; each stage module imports its own from here (``memkfac.compare`` its ``CompareArguments``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

from memkfac.devices import DTYPES, check_device_name
from memkfac.errors import MemkfacError
from memkfac.targets import PROJECTIONS, LayerSpec, Projection, check_layers


@dataclass(frozen=True)
class FieldProblem:
    field: str  # the dataclass field, e.g. "keep_mass"
    problem: str
    fix: str | None = None


class ArgumentError(MemkfacError, ValueError):
    """Bad values in an arguments dataclass: one ``FieldProblem`` per bad field."""

    def __init__(self, problems: list[FieldProblem]):
        self.problems = problems
        fixes = [p.fix for p in problems if p.fix]
        super().__init__("; ".join(p.problem for p in problems), "; ".join(fixes) or None)


class Checks:
    """What is wrong with one arguments object, collected field by field; ``done()`` raises it all."""

    def __init__(self) -> None:
        self.problems: list[FieldProblem] = []

    def require(self, ok: bool, field: str, problem: str, fix: str | None = None) -> None:
        if not ok:
            self.problems.append(FieldProblem(field, problem, fix))

    def at_least(self, field: str, value: int | float | None, low: int | float) -> None:
        """``value >= low`` (None passes: an optional field left unset)."""
        self.require(
            value is None or value >= low, field, f"{field} is {value!r}, below {low}", f"use {low} or more"
        )

    def positive(self, field: str, value: float) -> None:
        self.require(value > 0, field, f"{field} is {value!r}, not positive", "use a number above 0")

    def one_of(self, field: str, value: object, choices: Iterable) -> None:
        choices = tuple(choices)
        self.require(
            value in choices,
            field,
            f"{field} is {value!r}",
            f"use one of {', '.join(map(str, choices))}",
        )

    def subset(self, field: str, values: Iterable, choices: Iterable) -> None:
        """A non-empty selection from ``choices``."""
        values, choices = tuple(values), tuple(choices)
        unknown = [v for v in values if v not in choices]
        self.require(
            bool(values) and not unknown,
            field,
            f"unknown or no {field}: {list(values)}",
            f"use a non-empty selection of {', '.join(map(str, choices))}",
        )

    @contextlib.contextmanager
    def field(self, name: str) -> Iterator[None]:
        """Attribute a ``MemkfacError`` raised inside (by a shared check) to field ``name``."""
        try:
            yield
        except MemkfacError as e:
            self.problems.append(FieldProblem(name, e.problem, e.fix))

    def done(self) -> None:
        if self.problems:
            raise ArgumentError(self.problems)


# The rows ``memkfac compare`` can add beside the unedited model and the K-FAC edit, in report order.
COMPARE_METHODS = (
    "per_side",
    "svd",
    "random",
    "balanced_subnet",
    "ga_gd",
    "npo",
    "identity_basis",
    "block_deletion",
    "noise",
)
RELEARNED_METHODS = ("kfac", "ga_gd", "npo")  # the rows the relearning table tests


@dataclass
class ComputeArguments:
    """Where a step runs its model: the pipeline config's ``compute`` and each ``compute.steps`` entry."""

    device: str = "cpu"  # cpu, cuda, cuda:N or mps; checked to exist when the step starts
    dtype: Literal["float32", "bfloat16", "float16"] = (
        "float32"  # the model's dtype where it only runs forward
    )
    threads: int | None = None  # torch CPU threads of the step (torch.set_num_threads); null: torch's default

    def __post_init__(self):
        check = Checks()
        with check.field("device"):
            check_device_name(self.device, "device")
        check.one_of("dtype", self.dtype, DTYPES)
        check.at_least("threads", self.threads, 1)
        check.done()


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
    methods: tuple[str, ...] = COMPARE_METHODS  # rows besides base and K-FAC (always there)
    match_steps: int = 7  # bisection steps per perplexity-matched row
    # A row is matched when its sweep-perplexity increase over the base is within this share of the
    # K-FAC edit's increase (0.1: 90-110% of it); else the report marks it.
    match_tolerance: float = 0.1
    bsn_ratio: float | None = None  # None: BSNArguments' default
    bsn_epochs: int | None = None
    retain_blocks: int = 256  # blocks of the corpus's finetune split: retain set of the forget-set methods
    forget_steps: tuple[int, ...] = (10, 20, 40, 80, 160)  # GA+GD / NPO strength grid, in steps
    # GA+GD / NPO rates, tried in increasing order until a run's grid reaches the target perplexity
    forget_lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    npo_beta: float = 0.1
    relearn: bool = True  # the relearning table (K-FAC, GA+GD, NPO)
    relearn_steps: tuple[int, ...] = (10, 50, 200)
    mlflow: bool = True  # log the comparison (metrics, report, figure) to the pipeline's MLflow store
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
        unknown = set(self.methods) - set(COMPARE_METHODS)
        if unknown:
            raise MemkfacError(
                f"unknown comparison method(s) {sorted(unknown)}",
                f"choose from {', '.join(COMPARE_METHODS)} (base and K-FAC rows are always there)",
            )
        for name in ("forget_steps", "relearn_steps"):
            steps = getattr(self, name)
            if not steps or any(s < 1 for s in steps) or list(steps) != sorted(set(steps)):
                raise MemkfacError(f"{name} {list(steps)} must be increasing and positive", "e.g. 10,20,40")
        if not self.forget_lrs or any(not lr > 0 for lr in self.forget_lrs) or not self.npo_beta > 0:
            raise MemkfacError(
                f"forget_lrs {list(self.forget_lrs)} and npo_beta {self.npo_beta} must be positive",
                "e.g. forget_lrs 1e-4,1e-3 and npo_beta 0.1",
            )
        if not self.match_tolerance > 0:
            raise MemkfacError(
                f"match_tolerance {self.match_tolerance} must be positive", "e.g. 0.1 (within 10%)"
            )


@dataclass
class BSNArguments:
    layers: LayerSpec  # decoder layers whose MLP weights get a mask; a spec is resolved against the model
    projections: tuple[Projection, ...] = ("gate", "up")  # the K-FAC edit's; add "down" to widen
    method: Literal["balanced_subnet"] = "balanced_subnet"  # its name among the edit methods
    ratio: float = 0.01  # fraction of each masked matrix pruned (smallest |score|)
    loss_weight: float = 0.7  # alpha: weight of the retain term; 1 - alpha weighs the forget term
    lr: float = 0.3
    epochs: int = 20  # passes over the forget set
    forget_per_batch: int = 4  # forget sequences per step
    retain_per_batch: int = 4  # retain blocks per step (cycled)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        check = Checks()
        with check.field("layers"):
            check_layers(self.layers)
        check.subset("projections", self.projections, PROJECTIONS)
        check.one_of("method", self.method, ("balanced_subnet",))
        check.require(
            0 < self.ratio < 1,
            "ratio",
            f"ratio {self.ratio} is not a fraction in (0, 1)",
            "use e.g. 0.0015 to 0.05",
        )
        check.require(
            0 <= self.loss_weight <= 1,
            "loss_weight",
            f"loss weight {self.loss_weight} is not in [0, 1]",
            "use e.g. 0.7 (the paper's)",
        )
        check.positive("lr", self.lr)
        for name in ("epochs", "forget_per_batch", "retain_per_batch"):
            check.at_least(name, getattr(self, name), 1)
        check.at_least("momentum", self.momentum, 0)
        check.at_least("weight_decay", self.weight_decay, 0)
        check.done()


Decay = Literal["constant", "linear"]
DECAYS: tuple[Decay, ...] = get_args(Decay)


@dataclass
class FinetuneArguments:
    epochs: int = 20
    lr: float = 3e-4
    warmup_steps: int = 20
    decay: Decay = "constant"  # after warm-up: "constant" or "linear" (to 0 at the last step)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    train_layers: str = "all"  # decoder layers to train: "all", "14-29", "20,21" (targets.parse_layers)
    train_embeddings: bool = True  # input embeddings (and a tied lm_head)

    def __post_init__(self):
        check = Checks()
        check.at_least("epochs", self.epochs, 1)
        check.positive("lr", self.lr)
        check.at_least("warmup_steps", self.warmup_steps, 0)
        check.require(
            self.decay in DECAYS, "decay", f"unknown decay {self.decay!r}", "use 'constant' or 'linear'"
        )
        check.at_least("weight_decay", self.weight_decay, 0)
        check.positive("max_grad_norm", self.max_grad_norm)
        with check.field("train_layers"):
            check_layers(self.train_layers)
        check.done()


def _default_finetune() -> FinetuneArguments:
    # Layers 14-29 of 30 stay trainable (edits target late layers); the lower half and the tied
    # embeddings are frozen, so backward stops at layer 14. Measured on SmolLM2-135M: see docs/results.md.
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

    def __post_init__(self):
        check = Checks()
        check.at_least("canaries_per_batch", self.canaries_per_batch, 1)
        check.at_least("general_per_batch", self.general_per_batch, 0)
        for name in ("general_len", "eval_batch_size", "heldout_blocks"):
            check.at_least(name, getattr(self, name), 1)
        check.done()


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
