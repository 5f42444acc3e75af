"""The pipeline configuration: one YAML file, parsed by typed models into the engine's own arguments.

Each section is an engine ``*Arguments`` dataclass (``injection`` is ``memkfac.inject.InjectArguments``,
``factors`` is ``memkfac.factors.FactorArguments``, ...), validated by pydantic from the dataclass's
own fields and types, and then by the dataclass's ``__post_init__``, where every default and bound is
written once. Sections that also carry keys of the pipeline itself (``evaluation``, ``resurgence``)
list both in one mapping. On load:

- every unknown key, wrong type and out-of-range value is reported at once, each under its full key
  path (``injection.finetune.epochs``) with the fix, an unknown key with the closest known one;
- string values may reference environment variables as ``${VAR}`` (an unset one is an error);
- names that become partition keys and file names (models, edits) pass ``memkfac.paths.safe_name``,
  may not contain ``__`` (it joins model and edit in a variant key), and no edit is called ``base``;
- a relative ``canaries.file`` is resolved against ``MEMKFAC_HOME`` (the canaries asset validates
  its content, once, when it runs);
- ``extends: OTHER.yaml`` starts from another config and changes only what the file says
  (``read_extended``): ``configs/full.yaml`` is the default at a larger scale.

A variant is a model crossed with an edit (``smollm2-135m__kfac-r0.95``); every model also gets the
unedited reference variant ``<model>__base``. ``python -m resources.config --schema`` prints the
JSON Schema of the file (``configs/pipeline.schema.json``, which editors use to complete and check
the YAML).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import operator
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from memkfac.arguments import ArgumentError, ComputeArguments
from memkfac.bands import BandArguments
from memkfac.canaries import CanaryArguments
from memkfac.corpora import CorpusArguments
from memkfac.downstream import DownstreamArguments
from memkfac.errors import MemkfacError
from memkfac.evaluate import EvalArguments
from memkfac.factors import MODEL_DTYPES, FactorArguments
from memkfac.inject import InjectArguments
from memkfac.methods import DEFAULT_METHOD, METHODS
from memkfac.paths import memkfac_home, safe_name
from memkfac.resurgence import ResurgenceArguments
from memkfac.watch import WatchArguments

VARIANT_SEP = "__"
BASE_EDIT = "base"  # the unedited reference variant of every model
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "configs" / "pipeline.schema.json"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CRON_ALIASES = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually")
# keys of older configs -> what replaced them (the unknown-key error says so)
_RENAMED = {
    "resurgence.recipes": "did you mean 'arms'? The recipes became attack arms: general -> retain, "
    "partial_forget -> relearn, and the new unrelated (arms: [retain, relearn, unrelated])",
}


def _fail(problem: str, fix: str, *field: str) -> PydanticCustomError:
    """A validation error of ours; ``field`` continues the key path where pydantic's location ends."""
    return PydanticCustomError("memkfac", "{problem}", {"problem": problem, "fix": fix, "field": field})


def _checked_name(what: str, reserved: tuple[str, ...] = ()):
    def check(name: str) -> str:
        try:
            safe_name(name, what)
        except MemkfacError as e:
            raise _fail(e.problem, e.fix or "") from None
        if VARIANT_SEP in name:
            raise _fail(
                f"{what} {name!r} contains {VARIANT_SEP!r}", "it separates model and edit in variant keys"
            )
        if name in reserved:
            raise _fail(f"{what} {name!r} is reserved for the unedited model", "rename it")
        return name

    return AfterValidator(check)


ModelName = Annotated[str, _checked_name("model name")]
EditName = Annotated[str, _checked_name("edit name", reserved=(BASE_EDIT,))]


class Section(BaseModel):
    """A config section of the pipeline's own keys: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EngineSection(Section):
    """A section holding the fields of one engine arguments dataclass (``arguments``) next to the
    pipeline's own keys, in one flat mapping: the YAML never says ``arguments:``."""

    arguments: Any

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        engine = {f.name for f in dataclasses.fields(cls.model_fields["arguments"].annotation)}
        if clash := engine & set(cls.model_fields):
            raise TypeError(f"{cls.__name__}: keys {sorted(clash)} are also fields of its engine arguments")

    @classmethod
    def nest(cls, data: dict) -> dict:
        """The flat YAML mapping as the model's fields: the keys that are not its own under ``arguments``."""
        own = set(cls.model_fields) - {"arguments"}
        return {k: v for k, v in data.items() if k in own} | {
            "arguments": {k: v for k, v in data.items() if k not in own}
        }

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        arguments = handler.resolve_ref_schema(target["properties"].pop("arguments"))
        target["properties"] = arguments.get("properties", {}) | target["properties"]
        target["required"] = [r for r in target.get("required", []) if r != "arguments"]
        target["required"] += arguments.get("required", [])
        if not target["required"]:
            del target["required"]
        return schema


class ModelSpec(Section):
    source: str = Field(
        description="memkfac.models spec: builtin name, local Hugging Face directory or hub id"
    )
    inject_canaries: bool = Field(
        False, description="edit the base fine-tuned on the trained canaries (the default's ground truth)"
    )


class CanaryFile(Section):
    """The user's own canary probe set instead of generated canaries."""

    file: str = Field(
        description="JSONL probe set, relative to MEMKFAC_HOME: kind memorized (split sweep or holdout) is "
        "trained on, kind control is not"
    )

    @model_validator(mode="before")
    @classmethod
    def _not_with_generator_keys(cls, data: Any) -> Any:
        clash = (
            sorted(set(data) & set(CanaryArguments.__dataclass_fields__)) if isinstance(data, dict) else []
        )
        if clash:
            raise _fail(
                "is set together with canaries.file",
                f"remove canaries.{clash[0]} (it configures generated canaries) or canaries.file",
                clash[0],
            )
        return data

    @property
    def path(self) -> Path:
        path = Path(self.file)
        return path if path.is_absolute() else memkfac_home() / path

    @model_validator(mode="after")
    def _exists(self) -> CanaryFile:
        if not self.path.is_file():
            raise _fail(
                f"{self.path} does not exist",
                "give a JSONL probe set relative to MEMKFAC_HOME (or absolute)",
                "file",
            )
        return self


def _tag(cls: type) -> str:
    """A union member's tag: it shows in error locations, where ``_Schema.walk`` matches it to the
    member's schema by title (``<`` and ``>`` keep it apart from any configured name)."""
    return f"<{cls.__name__}>"


def _tagged(*classes: type) -> Any:
    return functools.reduce(operator.or_, [Annotated[cls, Tag(_tag(cls))] for cls in classes])


def _canaries_tag(value: Any) -> str:
    own_file = (isinstance(value, dict) and "file" in value) or isinstance(value, CanaryFile)
    return _tag(CanaryFile if own_file else CanaryArguments)


def _edit_tag(value: Any) -> str | None:
    method = (
        value.get("method", DEFAULT_METHOD) if isinstance(value, dict) else getattr(value, "method", None)
    )
    return _tag(METHODS[method].arguments) if method in METHODS else None


Canaries = Annotated[_tagged(CanaryArguments, CanaryFile), Discriminator(_canaries_tag)]
# one member per arguments class of memkfac.methods.METHODS, chosen by the entry's method
Edit = Annotated[
    _tagged(*dict.fromkeys(m.arguments for m in METHODS.values())),
    Discriminator(_edit_tag, custom_error_type="edit_method", custom_error_message="unknown edit method"),
]


class EvaluationSection(EngineSection):
    """``memkfac.evaluate.EvalArguments`` and the champion's budget."""

    arguments: EvalArguments = Field(default_factory=EvalArguments)
    max_perplexity_increase: float = Field(
        0.10,
        ge=0,
        description="the MLflow champion is the lowest-recall edit within this perplexity increase",
    )


def _cron(value: str) -> str:
    if value not in _CRON_ALIASES and len(value.split()) != 5:
        raise _fail(
            f"cron {value!r} is not a cron schedule", "give five fields, e.g. '0 3 * * 0' (Sunday 03:00)"
        )
    return value


class ResurgenceSection(EngineSection):
    """``memkfac.resurgence.ResurgenceArguments`` (the attack suite) and which edits it tests, how often."""

    arguments: ResurgenceArguments = Field(default_factory=ResurgenceArguments)
    edits: list[str] = Field(
        default_factory=list, description="edits given the attack suite (plus base); empty: all"
    )
    cron: Annotated[str, AfterValidator(_cron)] = Field(
        "0 3 * * 0", description="when the weekly_resurgence schedule reruns the suite, each tick a new seed"
    )


class MlflowSection(Section):
    tracking_uri: str | None = Field(
        None, description="default sqlite:///$MEMKFAC_HOME/mlflow/mlflow.db; MLFLOW_TRACKING_URI wins"
    )
    experiment: str = "memkfac"


# The steps that run a model, as ``compute.steps`` names them, and whether the model's dtype is theirs to
# choose: training steps and the edit keep the checkpoint's float32 weights, the eigh runs in float64.
COMPUTE_STEPS = {
    "injection": False,  # subject_model: fine-tunes the base on the canaries
    "factors": True,  # kfac_factors (in its own process; see compute.processes)
    "eigenbasis": False,  # kfac_eigenbasis
    "edits": False,  # edited_model and its check (the edit, or BalancedSubnet's training)
    "memorization_eval": True,
    "utility_eval": True,
    "downstream": True,  # downstream_base and downstream_eval
    "bands": True,  # band_analysis
    "resurgence": False,
}


class StepCompute(Section):
    """``compute`` keys that one step sets differently; the keys left out are ``compute``'s."""

    device: str | None = None
    dtype: str | None = None
    threads: int | None = None


class SlurmSection(Section):
    """The factor job under ``MEMKFAC_ENV=slurm`` (``sbatch`` options)."""

    partition: str | None = Field(None, description="sbatch --partition; null: the cluster's default")
    gpus: int | None = Field(
        None, ge=0, description="sbatch --gpus-per-node; null: processes on cuda, else 0"
    )
    cpus: int | None = Field(None, ge=1, description="sbatch --cpus-per-task; null: threads x processes")
    time: str = Field("4:00:00", description="sbatch --time, e.g. 30:00 or 1-12:00:00")
    mem: str | None = Field(None, description="sbatch --mem, e.g. 64G; null: the partition's default")
    extra_args: list[str] = Field(default_factory=list, description="more sbatch options (--account=x)")


class K8sSection(Section):
    """The factor pod under ``MEMKFAC_ENV=k8s`` (dagster-k8s ``PipesK8sClient``)."""

    image: str | None = Field(None, description="image holding the project at workdir, and its Python")
    volume_claim: str | None = Field(
        None, description="PersistentVolumeClaim holding MEMKFAC_HOME, mounted at the same path"
    )
    namespace: str | None = Field(None, description="the pod's namespace; null: the current one")
    gpus: int | None = Field(None, ge=0, description='limits["nvidia.com/gpu"]; null: processes on cuda')
    cpus: str | None = Field(None, description="CPU request and limit, e.g. '8'")
    memory: str | None = Field(None, description="memory request and limit, e.g. '64Gi'")
    workdir: str = Field("/app", description="the project directory inside the image")


@dataclass(frozen=True)
class Placement:
    """Where one step runs: its ``device``, ``dtype`` and ``threads``, and the config key each came
    from (``keys["device"]`` is ``compute.device`` or ``compute.steps.<step>.device``), for errors."""

    step: str
    device: str
    dtype: str
    threads: int | None
    keys: dict[str, str]

    def start(self) -> Placement:
        """Check the device and dtype on this machine and set the thread count; call first in a step.
        A device this machine lacks fails here, naming the config key, before any model loads."""
        import torch

        from memkfac.devices import resolve_device, resolve_dtype

        device = resolve_device(self.device, self.keys["device"])
        resolve_dtype(self.dtype, device, self.keys["dtype"])
        # steps may share a process (the main job runs them in process): an earlier step's count is undone
        torch.set_num_threads(self.threads or _process_threads())
        return self


@functools.cache
def _process_threads() -> int:
    """torch's thread count in this process before any step set its own."""
    import torch

    return torch.get_num_threads()


class ComputeSection(EngineSection):
    """Where the steps that run a model run: ``memkfac.arguments.ComputeArguments`` for every step,
    ``steps`` for the steps that differ, the factor step's processes and its Slurm job or pod."""

    arguments: ComputeArguments = Field(default_factory=ComputeArguments)
    processes: int = Field(
        1, ge=1, description="factor collection: data-parallel processes (torchrun), one GPU each on cuda"
    )
    steps: dict[Literal[tuple(COMPUTE_STEPS)], StepCompute] = Field(
        default_factory=dict, description="per step, the device, dtype or threads that differ from compute's"
    )
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    k8s: K8sSection = Field(default_factory=K8sSection)

    def of(self, step: str) -> Placement:
        """The placement of ``step`` (a ``COMPUTE_STEPS`` name)."""
        own = self.steps.get(step, StepCompute()).model_dump(exclude_none=True)
        merged = dataclasses.asdict(self.arguments) | own
        keys = {k: f"compute.steps.{step}.{k}" if k in own else f"compute.{k}" for k in merged}
        return Placement(step, **merged, keys=keys)

    @model_validator(mode="after")
    def _steps_are_valid(self) -> ComputeSection:
        problems = []
        for step, override in self.steps.items():
            try:
                ComputeArguments(
                    **dataclasses.asdict(self.arguments) | override.model_dump(exclude_none=True)
                )
            except ArgumentError as e:
                problems += [(f"compute.steps.{step}.{p.field}", p.problem, p.fix or "") for p in e.problems]
            if override.dtype is not None and not COMPUTE_STEPS[step]:
                problems.append(
                    (
                        f"compute.steps.{step}.dtype",
                        f"is set, but {step} keeps the checkpoint's weights (float32 training or float64 "
                        "algebra)",
                        f"remove compute.steps.{step}.dtype",
                    )
                )
        factors = self.of("factors")
        if factors.dtype not in MODEL_DTYPES:
            problems.append(
                (
                    factors.keys["dtype"],
                    f"is {factors.dtype!r}, which factor collection does not run in",
                    "use float32 or bfloat16 (compute.steps.factors.dtype keeps another dtype elsewhere)",
                )
            )
        if self.processes > 1 and re.fullmatch(r"cuda:\d+", factors.device):
            problems.append(
                (
                    factors.keys["device"],
                    f"is {factors.device!r} with compute.processes={self.processes}: each process takes its "
                    "own GPU (process r uses cuda:r)",
                    "use cuda, or compute.processes: 1 to use that one GPU",
                )
            )
        for runner in ("slurm", "k8s"):
            gpus = getattr(self, runner).gpus
            if gpus is not None and factors.device.startswith("cuda") and gpus < self.processes:
                problems.append(
                    (
                        f"compute.{runner}.gpus",
                        f"is {gpus} for compute.processes={self.processes} on {factors.device}",
                        f"request one GPU per process: {self.processes} (or leave it out)",
                    )
                )
        if problems:
            raise PydanticCustomError(
                "memkfac_cross", "{n} compute problems", {"n": len(problems), "problems": problems}
            )
        return self


class PipelineConfig(Section):
    """The whole pipeline YAML. Sections left out take the engine's defaults."""

    models: dict[ModelName, ModelSpec] = Field(min_length=1, description="base models, by name")
    corpus: CorpusArguments = Field(default_factory=CorpusArguments)
    canaries: Canaries = Field(default_factory=CanaryArguments)
    injection: InjectArguments = Field(default_factory=InjectArguments)
    factors: FactorArguments = Field(default_factory=FactorArguments)
    edits: dict[EditName, Edit] = Field(
        default_factory=dict, description="each becomes variant <model>__<name>; method picks the arguments"
    )
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    downstream: DownstreamArguments | None = Field(
        None, description="the offline task suite; absent: not run"
    )
    bands: BandArguments = Field(default_factory=BandArguments)
    resurgence: ResurgenceSection = Field(default_factory=ResurgenceSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    watch: WatchArguments = Field(default_factory=WatchArguments)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        problems = []
        for i, edit in enumerate(self.resurgence.edits):
            if edit not in self.edits:
                problems.append(
                    (
                        f"resurgence.edits[{i}]",
                        f"names {edit!r}, which is not under edits",
                        f"use some of {list(self.edits)}",
                    )
                )
        block_len = self.corpus.block_len
        for key in ("general_len", "unrelated_len"):
            length = getattr(self.resurgence.arguments, key)
            if length > block_len:
                problems.append(
                    (
                        f"resurgence.{key}",
                        f"is {length}; the corpus blocks hold {block_len} tokens",
                        f"use a resurgence.{key} from 1 to corpus.block_len ({block_len})",
                    )
                )
        if problems:
            raise PydanticCustomError(
                "memkfac_cross", "{n} cross-section problems", {"n": len(problems), "problems": problems}
            )
        return self

    @property
    def canary_file(self) -> Path | None:
        """The user's canary file (``canaries.file``), or None when the canaries are generated."""
        return self.canaries.path if isinstance(self.canaries, CanaryFile) else None

    @property
    def canary_source(self) -> CanaryArguments | Path:
        """What ``memkfac.canaries.canary_probes`` makes the canaries from."""
        return self.canary_file or self.canaries

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

    def edit_of(self, variant: str):
        """The arguments of the edit ``variant`` applies (an engine ``*Arguments``); None for the base."""
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


# --- loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    key: str  # the full key path, e.g. "injection.finetune.epochs"
    problem: str
    fix: str


class ConfigError(MemkfacError):
    """Every problem of a pipeline config, each under its key path."""

    def __init__(self, source: str, problems: list[ConfigProblem]):
        self.problems = problems
        lines = "".join(f"\n  {p.key}: {p.problem}; {p.fix}" for p in problems)
        count = f"{len(problems)} error" + ("s" if len(problems) > 1 else "")
        super().__init__(
            f"pipeline config {source} has {count}:{lines}",
            f"correct each key as its line says ({SCHEMA_PATH.name} next to the configs lists every key)",
        )


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: ``6e-4`` is a number, not the string PyYAML's 1.1 rules make it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Read and validate a pipeline YAML file, with the file it ``extends`` (``read_extended``); raise
    ``ConfigError`` listing every problem."""
    files: list[Path] = []
    raw = read_extended(Path(path), files)
    source = str(path) if len(files) == 1 else f"{path} (extending {', '.join(map(str, files[1:]))})"
    return parse_config(raw, source)


def read_extended(path: Path, files: list[Path] | None = None) -> Any:
    """The YAML mapping of ``path``; when it has ``extends: OTHER.yaml`` (relative to ``path``'s
    directory), that file's mapping with this one laid over it by ``merge_extended``, recursively.
    ``files`` collects the files read, ``path`` first."""
    files = [] if files is None else files
    if not path.is_file():
        raise MemkfacError(
            f"pipeline config {path} does not exist" + (f" ({files[-1]} extends it)" if files else ""),
            "give extends a path relative to the extending file"
            if files
            else "set MEMKFAC_CONFIG to a YAML file such as configs/default.yaml",
        )
    if path.resolve() in (f.resolve() for f in files):
        raise MemkfacError(
            f"pipeline configs extend each other in a cycle: {' -> '.join(map(str, [*files, path]))}",
            "remove the extends key of one of them",
        )
    files.append(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise MemkfacError(f"{path} is not valid YAML: {e}", "fix the syntax at the position shown") from e
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    target = raw.pop("extends")
    if not isinstance(target, str) or not target:
        raise ConfigError(
            str(path),
            [ConfigProblem("extends", f"is {target!r}", "give the path of another pipeline YAML file")],
        )
    base = read_extended(path.parent / target, files)
    _require_mapping(base, str(path.parent / target))
    return merge_extended(base, raw)


def merge_extended(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``: mappings merge key by key, any other value (a list too)
    replaces, and a key set to null is removed, so it takes its default (``edits: {svd-drop25: null}``
    drops a variant)."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_extended(merged[key], value)
        else:
            merged[key] = value
    return merged


def _require_mapping(raw: Any, source: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(
            source, [ConfigProblem("(top level)", f"is {type(raw).__name__}", "write 'section: ...' lines")]
        )


def parse_config(raw: Any, source: str = "<dict>") -> PipelineConfig:
    """Validate an already-parsed config mapping (see ``load_config``)."""
    _require_mapping(raw, source)
    unset: list[ConfigProblem] = []
    raw = _expand_env(raw, "", unset)
    if unset:
        raise ConfigError(source, unset)
    moved = _compute_keys_elsewhere(raw)
    try:
        config = PipelineConfig.model_validate_json(json.dumps(_prepare(raw), default=str))
    except ValidationError as e:
        raise ConfigError(source, moved + _problems(e)) from None
    if moved:
        raise ConfigError(source, moved)
    return config


# engine fields that the compute section sets for the pipeline: one place says where a step runs
_COMPUTE_KEYS = {
    ("factors", "model_dtype"): "factors",
    ("downstream", "device"): "downstream",
    ("downstream", "dtype"): "downstream",
}


def _compute_keys_elsewhere(raw: dict) -> list[ConfigProblem]:
    """Problems for the engine keys ``compute`` sets (``factors.model_dtype``), removed from ``raw``."""
    problems = []
    for (section, key), step in _COMPUTE_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            value = raw[section].pop(key)
            field = key.removeprefix("model_")
            problems.append(
                ConfigProblem(
                    f"{section}.{key}",
                    "is set by the compute section in the pipeline",
                    f"write compute.steps.{step}.{field}: {value} (or compute.{field} for every step)",
                )
            )
    return problems


def _prepare(raw: dict) -> dict:
    """The raw mapping as ``PipelineConfig``'s fields. Done here, not in a "before" validator, which
    would validate what follows it in Python mode, where a YAML list is not a tuple.

    An empty section (``bands:`` with every line commented out) is a section left out;
    ``resurgence.eval_batch_size`` defaults to ``evaluation.batch_size`` (resurgence decodes recall as
    the memorization evaluation does); an ``EngineSection``'s engine keys go under ``arguments``.
    """
    raw = {k: v for k, v in raw.items() if v is not None}
    evaluation, resurgence = raw.get("evaluation", {}), raw.get("resurgence", {})
    if (
        isinstance(evaluation, dict)
        and type(evaluation.get("batch_size")) is int
        and isinstance(resurgence, dict)
        and "eval_batch_size" not in resurgence
    ):
        raw["resurgence"] = resurgence | {"eval_batch_size": evaluation["batch_size"]}
    for name, field in PipelineConfig.model_fields.items():
        section = field.annotation
        if (
            isinstance(section, type)
            and issubclass(section, EngineSection)
            and isinstance(raw.get(name), dict)
        ):
            raw[name] = section.nest(raw[name])
    return raw


def _expand_env(value: Any, key: str, unset: list[ConfigProblem]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else str(k), unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]", unset) for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                unset.append(
                    ConfigProblem(
                        key, f"references ${{{m.group(1)}}}, which is not set", f"export {m.group(1)}=..."
                    )
                )
                return m.group(0)
            return os.environ[m.group(1)]

        return _ENV_REF.sub(sub, value)
    return value


# --- errors as key paths ------------------------------------------------------------------------

_TYPE_NAMES = {
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping ('key: value' lines)",
    "model_type": "a mapping ('key: value' lines)",
    "dataclass_type": "a mapping ('key: value' lines)",
    "dataclass_args_type": "a mapping ('key: value' lines)",
}
# a union member's label in an error location (pydantic's "int", "list[int]", ...) -> its JSON type
_LABEL_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "dict": "object"}
_LABEL_TYPES |= dict.fromkeys(("list", "tuple", "set"), "array")


class _Schema:
    """The config's JSON Schema, walked along an error's location to name keys and their neighbours."""

    def __init__(self):
        self.root = json_schema()
        self.defs = self.root.get("$defs", {})

    def branches(self, node: dict) -> list[dict]:
        while "$ref" in node:
            node = self.defs[node["$ref"].rsplit("/", 1)[-1]]
        alternatives = node.get("anyOf") or node.get("oneOf")
        return [b for alt in alternatives for b in self.branches(alt)] if alternatives else [node]

    def walk(self, loc: tuple) -> tuple[list[str], dict, int | None]:
        """The printed key parts of ``loc``, the schema node it reaches, and the index in ``loc`` of the
        first union member's label (None if none): errors past a label describe one member's try."""
        parts, node, label_at = [], self.root, None
        for i, element in enumerate(loc):
            candidates = self.branches(node)
            if isinstance(element, int):
                parts.append(f"[{element}]")
                node = next((b["items"] for b in candidates if "items" in b), {})
                continue
            tagged = [b for b in candidates if f"<{b.get('title')}>" == element]
            members = [b for b in candidates if b.get("type") != "null"]
            named = [b for b in candidates if element in b.get("properties", {})]
            mapping = [b for b in candidates if isinstance(b.get("additionalProperties"), dict)]
            if element == "[key]":
                continue
            if tagged:
                node = tagged[0]
            elif len(members) > 1:
                label_at = i if label_at is None else label_at
                json_type = _LABEL_TYPES.get(element.split("[", 1)[0])
                node = next((b for b in members if b.get("type") == json_type), node)
            elif named:
                parts.append(element)
                node = named[0]["properties"][element]
            elif mapping:
                parts.append(element)
                node = mapping[0]["additionalProperties"]
            # else: the "arguments" of an EngineSection, flattened in the YAML
        return parts, node, label_at

    def keys(self, node: dict) -> list[str]:
        return [k for b in self.branches(node) for k in b.get("properties", {})]

    def choices(self, node: dict) -> list:
        out = []
        for b in self.branches(node):
            out += b.get("enum", []) + ([b["const"]] if "const" in b else [])
            out += b.get("propertyNames", {}).get("enum", [])
        return out


def _join(parts: list[str]) -> str:
    return "".join(p if p.startswith("[") else f".{p}" for p in parts).lstrip(".") or "(top level)"


def _did_you_mean(word: Any, choices: list) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    listed = f"use one of {', '.join(map(str, choices))}" if choices else "remove it"
    return f"did you mean {close[0]!r}? ({listed})" if close else listed


def _describe(error: dict, schema: _Schema) -> tuple[list[ConfigProblem], int | None]:
    """What one pydantic error says, as problems under key paths, and where its union label is."""
    kind, loc, ctx, value = error["type"], tuple(error["loc"]), error.get("ctx") or {}, error.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parts, node, label_at = schema.walk(loc[:-1])
        key = _join([*parts, str(loc[-1])])
        fix = _RENAMED.get(key) or _did_you_mean(loc[-1], schema.keys(node))
        return [ConfigProblem(key, "is not a known key", fix)], label_at
    if kind == "literal_error" and loc[-1] == "[key]":  # a key of a mapping with fixed keys
        parts, node, label_at = schema.walk(loc[:-2])
        fix = _did_you_mean(loc[-2], schema.choices(node))
        return [ConfigProblem(_join([*parts, str(loc[-2])]), "is not a known key", fix)], label_at
    parts, node, label_at = schema.walk(loc)
    key = _join(parts)
    if kind == "value_error" and isinstance(ctx.get("error"), ArgumentError):
        problems = [
            ConfigProblem(_join([*parts, p.field]), p.problem, p.fix or "") for p in ctx["error"].problems
        ]
    elif kind == "memkfac_cross":
        problems = [ConfigProblem(*p) for p in ctx["problems"]]
    elif kind == "memkfac":
        problems = [ConfigProblem(_join([*parts, *ctx["field"]]), ctx["problem"], ctx["fix"])]
    elif kind in ("missing", "missing_argument"):
        problems = [ConfigProblem(key, "is missing", f"add {key}")]
    elif kind == "edit_method" and not isinstance(value, dict):
        problems = [ConfigProblem(key, f"is {value!r}", "give a mapping of method and its arguments")]
    elif kind == "edit_method":
        method = value.get("method")
        problems = [ConfigProblem(f"{key}.method", f"is {method!r}", _did_you_mean(method, list(METHODS)))]
    elif kind == "literal_error":
        problems = [ConfigProblem(key, f"is {value!r}", _did_you_mean(value, schema.choices(node)))]
    elif kind == "too_short":
        problems = [ConfigProblem(key, "is empty", f"give at least {ctx.get('min_length', 1)} entry")]
    elif kind in _TYPE_NAMES:
        problems = [ConfigProblem(key, f"is {value!r}", f"give {_TYPE_NAMES[kind]}")]
    else:
        problems = [ConfigProblem(key, f"is {value!r}: {error['msg']}", "see the schema")]
    return problems, label_at


def _problems(error: ValidationError) -> list[ConfigProblem]:
    """Every problem of a validation, in order. A value that fits no member of a union (``layers: 3.5``
    for a list or a spec) is one problem naming every accepted type; a value shaped like one member
    but wrong inside (``max_tokens: {factr: 4}``) keeps that member's problems only."""
    schema = _Schema()
    described = [(tuple(e["loc"]), *_describe(e, schema)) for e in error.errors(include_url=False)]
    sites: dict[tuple, list] = {}
    for loc, problems, label_at in described:
        if label_at is not None:
            sites.setdefault(loc[:label_at], []).append((len(loc) - label_at > 1, problems))
    out, merged = [], set()
    for loc, problems, label_at in described:
        site = None if label_at is None else loc[:label_at]
        if site is None:
            out += problems
        elif any(deep for deep, _ in sites[site]):  # the value had one member's shape
            out += problems if len(loc) - label_at > 1 else []
        elif site not in merged:
            merged.add(site)
            fixes = [p.fix.removeprefix("give ") for _, ps in sites[site] for p in ps]
            out.append(
                ConfigProblem(
                    problems[0].key, problems[0].problem, f"give {' or '.join(dict.fromkeys(fixes))}"
                )
            )
    return list(dict.fromkeys(out))


# --- the JSON Schema ----------------------------------------------------------------------------


class _DescribedSchema(GenerateJsonSchema):
    """Engine dataclasses document their fields in trailing comments; the schema carries them, so
    that an editor shows them next to each key."""

    def dataclass_schema(self, schema):
        json_schema = super().dataclass_schema(schema)
        source = inspect.getsource(schema["cls"])
        comments = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))
        for name, prop in json_schema.get("properties", {}).items():
            if name in comments:
                prop.setdefault("description", comments[name])
        if schema["cls"].__doc__ and not schema["cls"].__doc__.startswith(schema["cls"].__name__ + "("):
            json_schema.setdefault("description", inspect.cleandoc(schema["cls"].__doc__))
        return json_schema


def json_schema() -> dict:
    """The JSON Schema of the pipeline YAML (``configs/pipeline.schema.json``)."""
    schema = PipelineConfig.model_json_schema(schema_generator=_DescribedSchema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "memkfac pipeline config"
    schema["properties"]["extends"] = {
        "type": "string",
        "description": "Another pipeline YAML (relative to this file) that this one changes: mappings "
        "merge key by key, other values replace, null removes a key (load_config).",
    }
    # a file that extends another may leave out what that one has (models included)
    schema["if"] = {"not": {"required": ["extends"]}}
    schema["then"] = {"required": schema.pop("required")}

    def any_of(node: Any) -> Any:  # alternatives may overlap (defaults), so any one that fits is valid
        if isinstance(node, dict):
            node.pop("discriminator", None)
            return {("anyOf" if k == "oneOf" else k): any_of(v) for k, v in node.items()}
        return [any_of(v) for v in node] if isinstance(node, list) else node

    return any_of(schema)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m resources.config",
        description="Check a pipeline config, or print the JSON Schema of the pipeline YAML.",
    )
    parser.add_argument("config", nargs="?", type=Path, help="a pipeline YAML file to check")
    parser.add_argument("--schema", action="store_true", help=f"print the JSON Schema ({SCHEMA_PATH.name})")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    try:
        config = load_config(args.config or default_config_path())
    except MemkfacError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.config or default_config_path()}: ok, variants {', '.join(config.variants)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
