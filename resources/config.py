"""The pipeline configuration: one YAML file naming models, corpus, probe sets, edits and resurgence recipes.

It is validated once, on load, and every error names the offending key (``edits.kfac-r0.9.keep_mass``).
Names that become partition keys or file names (models, edits, probe sets) pass
``memkfac.paths.safe_name``, so no configured name can write outside ``MEMKFAC_HOME``.
String values may reference environment variables as ``${VAR}``; an unset variable is an error.
A relative input path (``canaries.file``) is resolved against ``MEMKFAC_HOME``.

A variant is a model crossed with an edit (``smollm2-135m__kfac-r0.95``); every model also gets the
unedited reference variant ``<model>__base``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memkfac.canaries import load_canaries
from memkfac.errors import MemkfacError
from memkfac.paths import memkfac_home, safe_name
from memkfac.probes import Probe

VARIANT_SEP = "__"
BASE_EDIT = "base"  # the unedited reference variant of every model
EDIT_METHODS = ("kfac", "per_side", "svd", "random", "balanced_subnet")
FT_RECIPES = ("general", "partial_forget")
CANARY_GENERATOR_KEYS = {"n_trained", "n_control", "seed", "locale"}  # memkfac.canaries.CanaryArguments
EVALUATION_KEYS = {"batch_size", "heldout_blocks", "max_perplexity_increase", "mia", "stress", "stress_t"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str  # memkfac.models.resolve_model spec: builtin name, local HF directory or hub id
    inject_canaries: bool = (
        False  # edit the base fine-tuned on the trained canaries (the default's ground truth)
    )


@dataclass(frozen=True)
class EditSpec:
    name: str
    method: str  # one of EDIT_METHODS
    layers: str  # memkfac.targets.parse_layers spec: "22-24", "22,23", "all"
    projections: tuple[str, ...] = ("gate", "up")
    keep_mass: float = 0.6  # rho: curvature mass kept
    svd_drop: float = 0.25
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific engine arguments


@dataclass(frozen=True)
class ResurgenceConfig:
    steps: tuple[int, ...] = (10, 50, 200)  # fine-tuning steps at which recall is measured
    recipes: tuple[str, ...] = FT_RECIPES
    edits: tuple[str, ...] = ()  # which edits get the test (plus base); empty = all
    lr: float = 3e-5
    batch_size: int = 4
    general_len: int = 64  # tokens per general-text sequence (memkfac.resurgence.ResurgenceArguments)
    train_layers: str = "all"  # decoder layers fine-tuned (memkfac.targets.parse_layers spec)
    seed: int = 0
    cron: str = "0 3 * * 0"  # weekly, Sunday 03:00


@dataclass(frozen=True)
class PipelineConfig:
    path: str  # the YAML file this came from
    models: dict[str, ModelConfig]
    corpus: dict[str, Any]  # memkfac.corpora.build_corpus keyword arguments, "source" included
    canaries: dict[str, Any]  # CanaryArguments arguments, or {"file": absolute path of the user's probe set}
    injection: dict[str, Any]  # memkfac.inject arguments
    factors: dict[str, Any]  # memkfac.factors.FactorArguments fields
    edits: dict[str, EditSpec]
    probe_sets: tuple[str, ...]  # probe sets known up front (more are discovered in the probe directory)
    evaluation: dict[str, Any]  # EVALUATION_KEYS: max_perplexity_increase is the champion budget
    downstream: dict[str, Any]  # memkfac.downstream.DownstreamArguments; empty = no downstream assets
    bands: dict[str, Any]  # memkfac.bands.run_band_analysis keyword arguments (tasks, max_tokens, ...)
    resurgence: ResurgenceConfig
    mlflow: dict[str, Any]

    @property
    def variants(self) -> list[str]:
        """Every variant key: ``<model>__base`` and ``<model>__<edit>`` for each model and edit."""
        return [variant_key(m, e) for m in self.models for e in (BASE_EDIT, *self.edits)]

    def variants_of(self, model: str) -> list[str]:
        return [v for v in self.variants if split_variant(v)[0] == model]

    @property
    def resurgence_variants(self) -> list[str]:
        wanted = set(self.resurgence.edits or self.edits) | {BASE_EDIT}
        return [v for v in self.variants if split_variant(v)[1] in wanted]

    def edit_of(self, variant: str) -> EditSpec | None:
        """The edit applied by ``variant``; None for the unedited base."""
        edit = split_variant(variant)[1]
        return None if edit == BASE_EDIT else self.edits[edit]


def variant_key(model: str, edit: str) -> str:
    return f"{model}{VARIANT_SEP}{edit}"


def split_variant(variant: str) -> tuple[str, str]:
    model, sep, edit = variant.rpartition(VARIANT_SEP)
    if not sep:
        raise MemkfacError(f"{variant!r} is not a variant key", f"use MODEL{VARIANT_SEP}EDIT")
    return model, edit


def default_config_path() -> Path:
    """``configs/default.yaml`` of this project."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Read and validate a pipeline YAML file; raise MemkfacError naming the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise MemkfacError(
            f"pipeline config {path} does not exist",
            "set MEMKFAC_CONFIG to a YAML file such as configs/default.yaml",
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MemkfacError(f"{path} is not valid YAML: {e}", "fix the syntax at the position shown") from e
    return parse_config(_expand_env(raw, ""), str(path))


def parse_config(raw: Any, path: str = "<dict>") -> PipelineConfig:
    """Validate an already-parsed config mapping (see ``load_config``)."""
    top = _mapping(raw, "(top level)")
    _known(
        top,
        "",
        {"models", "corpus", "canaries", "injection", "factors", "edits", "probe_sets", "evaluation"}
        | {"downstream", "bands", "resurgence", "mlflow"},
    )
    models = {}
    for name, m in _mapping(top.get("models"), "models", required=True).items():
        key = f"models.{name}"
        _name(name, key, "model name")
        m = _mapping(m, key, required=True)
        _known(m, key, {"source", "inject_canaries"})
        models[name] = ModelConfig(
            name=name,
            source=_typed(m, "source", str, key, required=True),
            inject_canaries=_typed(m, "inject_canaries", bool, key, False),
        )
    if not models:
        raise MemkfacError("models is empty", "name at least one model under models:")

    edits = {}
    for name, e in _mapping(top.get("edits"), "edits").items():
        key = f"edits.{name}"
        _name(name, key, "edit name")
        if name == BASE_EDIT:
            raise MemkfacError(f"{key}: '{BASE_EDIT}' is reserved for the unedited model", "rename the edit")
        e = _mapping(e, key, required=True)
        _known(e, key, {"method", "layers", "projections", "keep_mass", "svd_drop", "seed", "options"})
        method = _typed(e, "method", str, key, "kfac")
        if method not in EDIT_METHODS:
            raise MemkfacError(f"{key}.method is {method!r}", f"use one of {', '.join(EDIT_METHODS)}")
        layers = str(_typed(e, "layers", (str, int), key, ""))
        if not layers:
            raise MemkfacError(f"{key}.layers is missing", "give the layers to edit, e.g. layers: '22-24'")
        keep_mass = float(_typed(e, "keep_mass", (int, float), key, 0.6))
        if not 0.0 <= keep_mass <= 1.0:
            raise MemkfacError(
                f"{key}.keep_mass is {keep_mass}", "use a fraction in [0, 1] (1 keeps everything)"
            )
        projections = tuple(_typed(e, "projections", list, key, ["gate", "up"]))
        if not projections or not set(projections) <= {"gate", "up", "down"}:
            raise MemkfacError(
                f"{key}.projections is {list(projections)}", "use a non-empty subset of gate, up, down"
            )
        edits[name] = EditSpec(
            name=name,
            method=method,
            layers=layers,
            projections=projections,
            keep_mass=keep_mass,
            svd_drop=float(_typed(e, "svd_drop", (int, float), key, 0.25)),
            seed=_typed(e, "seed", int, key, 0),
            options=_mapping(e.get("options"), f"{key}.options"),
        )

    probe_sets = tuple(_typed(top, "probe_sets", list, "", []))
    for i, p in enumerate(probe_sets):
        _name(p, f"probe_sets[{i}]", "probe-set name")

    r = _mapping(top.get("resurgence"), "resurgence")
    _known(r, "resurgence", set(ResurgenceConfig.__dataclass_fields__))
    steps = tuple(_typed(r, "steps", list, "resurgence", [10, 50, 200]))
    if not steps or any(not isinstance(s, int) or s <= 0 for s in steps) or list(steps) != sorted(set(steps)):
        raise MemkfacError(
            f"resurgence.steps is {list(steps)}", "use increasing positive step counts, e.g. [10, 50, 200]"
        )
    recipes = tuple(_typed(r, "recipes", list, "resurgence", list(FT_RECIPES)))
    if not recipes or not set(recipes) <= set(FT_RECIPES):
        raise MemkfacError(
            f"resurgence.recipes is {list(recipes)}", f"use a non-empty subset of {list(FT_RECIPES)}"
        )
    r_edits = tuple(_typed(r, "edits", list, "resurgence", []))
    for e in r_edits:
        if e not in edits:
            raise MemkfacError(
                f"resurgence.edits names {e!r}, which is not under edits:", f"use some of {list(edits)}"
            )
    resurgence = ResurgenceConfig(
        steps=steps,
        recipes=recipes,
        edits=r_edits,
        lr=float(_typed(r, "lr", (int, float), "resurgence", 3e-5)),
        batch_size=_typed(r, "batch_size", int, "resurgence", 4),
        general_len=_typed(r, "general_len", int, "resurgence", 64),
        train_layers=str(_typed(r, "train_layers", str, "resurgence", "all")),
        seed=_typed(r, "seed", int, "resurgence", 0),
        cron=_typed(r, "cron", str, "resurgence", "0 3 * * 0"),
    )
    evaluation = _mapping(top.get("evaluation"), "evaluation")
    _known(evaluation, "evaluation", EVALUATION_KEYS)
    for name in ("batch_size", "heldout_blocks", "stress_t", "mia", "stress"):
        _typed(evaluation, name, bool if name in ("mia", "stress") else int, "evaluation")
    _typed(evaluation, "max_perplexity_increase", (int, float), "evaluation")
    corpus = _mapping(top.get("corpus"), "corpus")
    _typed(corpus, "source", str, "corpus", "stdlib")
    block_len = _typed(corpus, "block_len", int, "corpus", 128)  # memkfac.corpora.build_corpus's default
    if not 1 <= resurgence.general_len <= block_len:
        raise MemkfacError(
            f"resurgence.general_len is {resurgence.general_len}; the corpus blocks hold {block_len} tokens",
            f"use a resurgence.general_len from 1 to corpus.block_len ({block_len})",
        )
    mlflow = _mapping(top.get("mlflow"), "mlflow")
    _known(mlflow, "mlflow", {"tracking_uri", "experiment"})
    return PipelineConfig(
        path=path,
        models=models,
        corpus={"source": "stdlib", **corpus},
        canaries=_canaries(_mapping(top.get("canaries"), "canaries")),
        injection=_mapping(top.get("injection"), "injection"),
        factors=_mapping(top.get("factors"), "factors"),
        edits=edits,
        probe_sets=probe_sets,
        evaluation=evaluation,
        downstream=_mapping(top.get("downstream"), "downstream"),
        bands=_mapping(top.get("bands"), "bands"),
        resurgence=resurgence,
        mlflow=mlflow,
    )


def _canaries(section: dict) -> dict:
    """The canaries section: generator arguments, or ``file:`` (a user's probe set, validated now)."""
    _known(section, "canaries", CANARY_GENERATOR_KEYS | {"file"})
    if "file" not in section:
        return section
    clash = sorted(CANARY_GENERATOR_KEYS & set(section))
    if clash:
        raise MemkfacError(
            f"canaries.{clash[0]} is set together with canaries.file",
            f"remove canaries.{clash[0]} (it configures generated canaries) or canaries.file",
        )
    path = Path(_typed(section, "file", str, "canaries", required=True))
    path = path if path.is_absolute() else memkfac_home() / path
    load_canary_file(path)
    return {"file": str(path)}


def load_canary_file(path: Path) -> list[Probe]:
    """The user's canary file, checked as ``memkfac inject --probes`` checks it; errors name the key."""
    return load_canaries(path, "canaries.file")


def _expand_env(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise MemkfacError(
                    f"{key} references ${{{m.group(1)}}}, which is not set", f"export {m.group(1)}=..."
                )
            return os.environ[m.group(1)]

        return _ENV_REF.sub(sub, value)
    return value


def _mapping(value: Any, key: str, required: bool = False) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise MemkfacError(
            f"{key} must be a mapping, got {type(value).__name__}", f"write {key} as 'name: value' lines"
        )
    return value


def _known(mapping: dict, key: str, allowed: set[str]) -> None:
    for k in mapping:
        if k not in allowed:
            where = f"{key}.{k}" if key else str(k)
            raise MemkfacError(f"unknown key {where}", f"use one of {', '.join(sorted(allowed))}")


def _typed(mapping: dict, name: str, types, key: str, default: Any = None, required: bool = False) -> Any:
    where = f"{key}.{name}" if key else name
    if name not in mapping or mapping[name] is None:
        if required:
            raise MemkfacError(f"{where} is missing", f"add {where} to the config")
        return default
    value = mapping[name]
    if (
        isinstance(value, bool)
        and types is not bool
        and bool not in (types if isinstance(types, tuple) else (types,))
    ):
        raise MemkfacError(f"{where} is a boolean", "give a value of the documented type")
    if not isinstance(value, types):
        raise MemkfacError(f"{where} has type {type(value).__name__}", f"give a {types}")
    return value


def _name(name: Any, key: str, what: str) -> str:
    try:
        safe_name(name, what)
    except MemkfacError as e:
        raise MemkfacError(f"{key}: {e.problem}", e.fix) from None
    if VARIANT_SEP in name:
        raise MemkfacError(
            f"{key}: {what} {name!r} contains {VARIANT_SEP!r}", "it separates model and edit in keys"
        )
    return name
