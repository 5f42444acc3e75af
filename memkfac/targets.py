"""Which linear maps of a causal LM are tracked (factors) and edited: the MLP gate/up/down projections.

Discovery works on any Hugging Face decoder whose MLP blocks name their projections ``gate_proj``,
``up_proj`` and ``down_proj`` under ``...layers.<i>.mlp`` (Llama, OLMo-2, Qwen2/3, Mistral, Gemma).
Other models are reached through name patterns.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

from memkfac.errors import MemkfacError

if TYPE_CHECKING:  # torch loads where modules are found, so the command line starts without it
    from torch import nn

Projection = Literal["gate", "up", "down"]
PROJECTIONS: tuple[Projection, ...] = get_args(Projection)
# Decoder layers as indices, or as a spec (``"22-24"``, ``"all"``) that ``resolve_layers`` turns into
# indices once the model is known: what the arguments dataclasses' ``layers`` fields accept.
LayerSpec = list[int] | str
_MLP_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate|up|down)_proj$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One tracked linear map ``y = x W^T`` with ``W`` of shape (out_features, in_features)."""

    name: str  # full module name, e.g. "model.layers.22.mlp.gate_proj"
    layer: int  # decoder layer index
    proj: str  # "gate" | "up" | "down" (or the module's last name component for pattern targets)
    in_features: int
    out_features: int

    @property
    def input_group(self) -> str:
        """Name of the activation covariance A this map reads: gate and up of one MLP share their input."""
        parent, _, last = self.name.rpartition(".")
        return f"{parent}.gate_up_proj" if last in ("gate_proj", "up_proj") else self.name

    def to_json(self) -> dict:
        return asdict(self)


def _spec_indices(spec: str) -> list[int] | None:
    """The indices a spec names as written (negative ones unresolved); None for ``"all"``."""
    if spec.strip().lower() == "all":
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            span = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
            layers.extend(range(int(span.group(1)), int(span.group(2)) + 1) if span else [int(part)])
    except ValueError:
        raise MemkfacError(
            f"cannot parse layer spec {spec!r}",
            "write layers as '22,23,24', a range '22-24', a mix '20-22,25', or 'all'",
        ) from None
    if not layers:
        raise MemkfacError(f"layer spec {spec!r} names no layers", "e.g. '22-24'")
    return layers


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Parse a layer spec: ``"22,23,24"``, ``"22-24"``, ``"20-22,25"``, ``"all"``; -1 is the last layer."""
    named = _spec_indices(spec)
    if named is None:
        return list(range(num_layers))
    layers = [i + num_layers if -num_layers <= i < 0 else i for i in named]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise MemkfacError(
            f"layer spec {spec!r} names layers {bad} outside the model's 0..{num_layers - 1}",
            f"choose layers between 0 and {num_layers - 1}",
        )
    return sorted(set(layers))


def check_layers(layers: LayerSpec) -> None:
    """What can be checked of ``layers`` before the model is known: the spec's syntax, or a
    non-empty list of indices."""
    if isinstance(layers, str):
        _spec_indices(layers)
    elif not layers:
        raise MemkfacError("no layers given", "name decoder layers, e.g. [22, 23, 24] or '22-24'")


Arguments = TypeVar("Arguments")


def resolve_layers(args: Arguments, num_layers: int) -> Arguments:
    """``args`` (an arguments dataclass with a ``layers`` field) with a layer spec turned into the
    indices it names in a model of ``num_layers`` decoder layers; unchanged if they are indices."""
    if not isinstance(args.layers, str):
        return args
    return dataclasses.replace(args, layers=parse_layers(args.layers, num_layers))


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def find_targets(
    model: nn.Module,
    layers: Sequence[int] | None = None,
    projections: Sequence[str] = PROJECTIONS,
    patterns: Sequence[str] | None = None,
) -> list[Target]:
    """Find the tracked linear maps of ``model``, in module order.

    By default: every ``layers.<i>.mlp.{gate,up,down}_proj`` ``nn.Linear`` with ``i`` in ``layers``
    (all layers when None) and projection in ``projections``. ``patterns`` replaces the default name
    rule: each pattern is an fnmatch glob over full module names (``"*.layers.2?.mlp.*_proj"``) or, with
    a ``re:`` prefix, a full-match regular expression; ``layers`` still filters on the first integer
    component of the name. Raises ``MemkfacError`` listing the linear modules found when none match.
    """
    unknown = [p for p in projections if p not in PROJECTIONS] if patterns is None else []
    if unknown:
        raise MemkfacError(f"unknown projection(s) {unknown}", f"choose from {', '.join(PROJECTIONS)}")
    from torch import nn

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = []
    for name, module in linears:
        if patterns is None:
            match = _MLP_NAME.search(name)
            if match is None or match.group(2) not in projections:
                continue
            layer, proj = int(match.group(1)), match.group(2)
        else:
            if not any(_matches(name, p) for p in patterns):
                continue
            index = _LAYER_INDEX.search(f".{name}.")
            layer = int(index.group(1)) if index else -1
            proj = name.rpartition(".")[2].removesuffix("_proj")
        if layers is not None and layer not in layers:
            continue
        targets.append(Target(name, layer, proj, module.in_features, module.out_features))
    if not targets:
        listing = ", ".join(n for n, _ in linears[:40]) + (" ..." if len(linears) > 40 else "")
        rule = f"patterns {list(patterns)}" if patterns is not None else f"projections {list(projections)}"
        raise MemkfacError(
            f"no linear module matches {rule} in layers {list(layers) if layers is not None else 'all'}; "
            f"the model's {len(linears)} linear modules are: {listing or '(none)'}",
            "pick layers that exist, or pass name patterns (fnmatch globs, or 're:' regexes) that match "
            "the modules listed",
        )
    return targets
