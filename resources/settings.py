"""Settings from the environment, read in one place, and the resources bound for each environment.

| variable | default | meaning |
|---|---|---|
| ``MEMKFAC_HOME`` | ``.memkfac`` | data root (models, factors, edits, evals, reports, MLflow store) |
| ``MEMKFAC_CONFIG`` | ``configs/default.yaml`` | the pipeline YAML |
| ``MEMKFAC_ENV`` | ``local`` | factor step: ``local`` (subprocess), ``slurm`` (batch job), ``k8s`` (pod) |
| ``MLFLOW_TRACKING_URI`` | sqlite file under ``$MEMKFAC_HOME/mlflow`` | overrides ``mlflow.tracking_uri`` |

The pipeline config's ``compute`` section says where every step runs (device, dtype, threads, the factor
step's processes, its Slurm job or pod); ``MEMKFAC_ENV`` says which runner takes the factor step there.
For one run with other resources without editing the config, a variable below that is set wins over
its config key (the errors then name the variable):

| variable | overrides | meaning |
|---|---|---|
| ``MEMKFAC_FACTOR_DEVICE`` | ``compute.steps.factors.device`` | ``cpu``, ``cuda``, ``cuda:N``, ``mps`` |
| ``MEMKFAC_FACTOR_PROCESSES`` | ``compute.processes`` | data-parallel processes, a GPU each on cuda |
| ``MEMKFAC_SLURM_{PARTITION,GPUS,CPUS,TIME,MEM}`` | ``compute.slurm.*`` | ``sbatch`` options |
| ``MEMKFAC_K8S_{IMAGE,NAMESPACE,GPUS,CPUS,MEMORY,WORKDIR}`` | ``compute.k8s.*`` | the pod |
| ``MEMKFAC_K8S_VOLUME`` | ``compute.k8s.volume_claim`` | PersistentVolumeClaim holding ``MEMKFAC_HOME`` |
| ``MEMKFAC_SLURM_ARGS`` | ``compute.slurm.extra_args`` | more ``sbatch`` options, shell-quoted |

What only this machine knows stays in the environment:

| variable | default | meaning |
|---|---|---|
| ``MEMKFAC_FACTOR_PYTHON`` | this interpreter | Python that runs the collection (local and slurm) |
| ``MEMKFAC_FACTOR_LAUNCHER`` | none | local only: command prefix, shell-quoted (``docker run ...``) |
| ``MEMKFAC_FACTOR_ENV`` | none | ``NAME=VALUE`` pairs (shell-quoted) added to the collection's environment |

The Pipes context and messages of ``local`` and ``slurm`` go through files under ``$MEMKFAC_HOME/pipes``,
so the project, its Python and ``MEMKFAC_HOME`` must be on a disk the compute node shares (they are,
on one machine); ``k8s`` passes the context in the pod's environment and reads messages from its log.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from memkfac.devices import check_device_name
from memkfac.errors import MemkfacError
from memkfac.paths import memkfac_home
from resources.config import ComputeSection, PipelineConfig, default_config_path, load_config

PROJECT_DIR = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = PROJECT_DIR / "dbt_reports"
# dbt-core installs its `dbt` script next to this interpreter; PATH may not include the venv.
DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")


ENVIRONMENTS = ("local", "slurm", "k8s")


@dataclass(frozen=True)
class SlurmSettings:
    """The factor step's batch job (``sbatch`` options)."""

    partition: str | None = None
    gpus: int = 0
    cpus: int = 1
    time: str = "4:00:00"
    mem: str | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class K8sSettings:
    """The factor step's pod (``PipesK8sClient``)."""

    image: str | None = None
    namespace: str | None = None
    gpus: int = 0
    cpus: str | None = None
    memory: str | None = None
    volume_claim: str | None = None
    workdir: str = "/app"


@dataclass(frozen=True)
class FactorCompute:
    """Where the factor step runs, on what device, in what dtype and with how many processes: the config's
    ``compute`` for the factor step, with the environment's overrides applied."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    processes: int = 1
    python: str = sys.executable
    launcher: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    k8s: K8sSettings = field(default_factory=K8sSettings)
    # what errors raised where the step runs call each setting: its config key or the variable that set it
    setting_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls, env: str, compute: ComputeSection, environ: Mapping[str, str] = os.environ
    ) -> FactorCompute:
        """The factor step's settings for ``MEMKFAC_ENV=env`` from ``compute``, each overridden by its
        variable where that is set; errors name the variable or the key."""
        placement = compute.of("factors")
        names = dict(placement.keys)

        def given(setting: str, variable: str) -> str | None:
            value = environ.get(variable, "").strip() or None
            if value is not None:
                names[setting] = variable
            return value

        def number(setting: str, variable: str, configured: int | None, minimum: int) -> int | None:
            return configured if given(setting, variable) is None else _int(environ, variable, minimum)

        device = check_device_name(
            given("device", "MEMKFAC_FACTOR_DEVICE") or placement.device, names["device"]
        )
        names["processes"] = "compute.processes"
        processes = number("processes", "MEMKFAC_FACTOR_PROCESSES", compute.processes, 1)
        if processes > 1 and device != "cuda" and device.startswith("cuda"):
            raise MemkfacError(
                f"{names['device']} is {device!r} with {names['processes']}={processes}: each process takes "
                "its own GPU (process r uses cuda:r)",
                f"set {names['device']} to cuda, or {names['processes']} to 1 to use that one GPU",
            )
        launcher = parse_launcher(environ.get("MEMKFAC_FACTOR_LAUNCHER", ""))
        if launcher and env != "local":
            raise MemkfacError(
                f"MEMKFAC_FACTOR_LAUNCHER is set with MEMKFAC_ENV={env}, where it has no meaning",
                "unset MEMKFAC_FACTOR_LAUNCHER: the job's resources come from compute.slurm or compute.k8s",
            )
        gpus_default = processes if device.startswith("cuda") else 0
        threads = placement.threads
        s, k = compute.slurm, compute.k8s
        for key in ("partition", "gpus", "cpus", "time", "mem"):
            names.setdefault(f"slurm.{key}", f"compute.slurm.{key}")
        slurm = SlurmSettings(
            partition=given("slurm.partition", "MEMKFAC_SLURM_PARTITION") or s.partition,
            gpus=_or(number("slurm.gpus", "MEMKFAC_SLURM_GPUS", s.gpus, 0), gpus_default),
            cpus=_or(number("slurm.cpus", "MEMKFAC_SLURM_CPUS", s.cpus, 1), (threads or 1) * processes),
            time=given("slurm.time", "MEMKFAC_SLURM_TIME") or s.time,
            mem=given("slurm.mem", "MEMKFAC_SLURM_MEM") or s.mem,
            extra_args=tuple(_split(environ["MEMKFAC_SLURM_ARGS"], "MEMKFAC_SLURM_ARGS"))
            if environ.get("MEMKFAC_SLURM_ARGS", "").strip()
            else tuple(s.extra_args),
        )
        for key in ("image", "volume_claim", "gpus"):
            names.setdefault(f"k8s.{key}", f"compute.k8s.{key}")
        k8s = K8sSettings(
            image=given("k8s.image", "MEMKFAC_K8S_IMAGE") or k.image,
            namespace=environ.get("MEMKFAC_K8S_NAMESPACE") or k.namespace,
            gpus=_or(number("k8s.gpus", "MEMKFAC_K8S_GPUS", k.gpus, 0), gpus_default),
            cpus=environ.get("MEMKFAC_K8S_CPUS") or k.cpus,
            memory=environ.get("MEMKFAC_K8S_MEMORY") or k.memory,
            volume_claim=given("k8s.volume_claim", "MEMKFAC_K8S_VOLUME") or k.volume_claim,
            workdir=environ.get("MEMKFAC_K8S_WORKDIR") or k.workdir,
        )
        if env == "slurm":
            if shutil.which("sbatch") is None:
                raise MemkfacError(
                    "MEMKFAC_ENV=slurm but sbatch is not on PATH (no Slurm client on this machine)",
                    "run Dagster where Slurm's client tools are, or try a one-node cluster here: "
                    "sudo scripts/slurm-local.sh start",
                )
            _enough_gpus(device, processes, slurm.gpus, names["slurm.gpus"], names["processes"])
        if env == "k8s":
            missing = [names[f"k8s.{x}"] for x in ("image", "volume_claim") if not getattr(k8s, x)]
            if missing:
                raise MemkfacError(
                    f"MEMKFAC_ENV=k8s needs {' and '.join(missing)}",
                    "set compute.k8s.image to an image holding the project (at compute.k8s.workdir) and "
                    "compute.k8s.volume_claim to the PersistentVolumeClaim that holds MEMKFAC_HOME",
                )
            _enough_gpus(device, processes, k8s.gpus, names["k8s.gpus"], names["processes"])
        return cls(
            device=device,
            dtype=placement.dtype,
            threads=threads,
            processes=processes,
            python=environ.get("MEMKFAC_FACTOR_PYTHON", sys.executable),
            launcher=launcher,
            env=parse_env_pairs(environ.get("MEMKFAC_FACTOR_ENV", "")),
            slurm=slurm,
            k8s=k8s,
            setting_names={key.removeprefix("slurm."): name for key, name in names.items()},
        )


@dataclass(frozen=True)
class Settings:
    home: Path
    config_path: Path
    env: str
    factor: FactorCompute = field(default_factory=FactorCompute)

    @classmethod
    def from_env(cls, config: PipelineConfig | None = None) -> Settings:
        """Read the environment (and ``config``, default: the one ``MEMKFAC_CONFIG`` names, for the factor
        step's compute settings); raise MemkfacError naming the variable or key that is wrong."""
        env = os.environ.get("MEMKFAC_ENV", "local")
        if env not in ENVIRONMENTS:
            raise MemkfacError(
                f"MEMKFAC_ENV is {env!r}, which has no resource binding",
                f"use one of {', '.join(ENVIRONMENTS)}",
            )
        config_path = Path(os.environ.get("MEMKFAC_CONFIG", default_config_path())).resolve()
        compute = (config or load_config(config_path)).compute
        return cls(
            home=memkfac_home(),
            config_path=config_path,
            env=env,
            factor=FactorCompute.resolve(env, compute),
        )

    def mlflow_uri(self, config: PipelineConfig) -> str:
        return (
            os.environ.get("MLFLOW_TRACKING_URI")
            or config.mlflow.tracking_uri
            or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        )


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _split(value: str, variable: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as e:
        raise MemkfacError(f"{variable} is not shell-quoted correctly ({e})", "close the quotes") from None


def _int(environ: Mapping[str, str], variable: str, minimum: int) -> int:
    value = environ[variable].strip()
    if not re.fullmatch(r"-?\d+", value) or int(value) < minimum:
        raise MemkfacError(
            f"{variable} is {value!r}, not a whole number >= {minimum}",
            f"set {variable} to e.g. {max(minimum, 1)}",
        )
    return int(value)


def _enough_gpus(device: str, processes: int, gpus: int, setting: str, processes_setting: str) -> None:
    if device.startswith("cuda") and gpus < processes:
        raise MemkfacError(
            f"{setting}={gpus} GPUs for {processes_setting}={processes} processes on {device}",
            f"request one GPU per process: {setting}={processes} (or leave it out)",
        )


def parse_launcher(value: str) -> tuple[str, ...]:
    """A launcher command prefix; its program must be on PATH (checked now, not at the first run)."""
    words = _split(value, "MEMKFAC_FACTOR_LAUNCHER")
    if words and shutil.which(words[0]) is None:
        raise MemkfacError(
            f"MEMKFAC_FACTOR_LAUNCHER starts with {words[0]!r}, which is not an executable on PATH",
            "give a launcher that exists here, e.g. 'srun --gpus=1', or unset it to run locally",
        )
    return tuple(words)


def parse_env_pairs(value: str) -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE`` words (shell-quoted) as pairs."""
    pairs = []
    for word in _split(value, "MEMKFAC_FACTOR_ENV"):
        name, sep, val = word.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise MemkfacError(
                f"MEMKFAC_FACTOR_ENV has {word!r}, which is not NAME=VALUE",
                "write space-separated NAME=VALUE pairs, e.g. 'CUDA_VISIBLE_DEVICES=0 HF_HOME=/scratch/hf'",
            )
        pairs.append((name, val))
    return tuple(pairs)


def factor_runner(settings: Settings):
    """The factor runner of ``settings.env``, from ``settings.factor``."""
    from resources.factor_runner import K8sFactorRunner, SlurmFactorRunner, SubprocessFactorRunner

    f = settings.factor
    common = dict(
        device=f.device,
        dtype=f.dtype,
        threads=f.threads,
        processes=f.processes,
        setting_names=f.setting_names,
    )
    if settings.env == "k8s":
        return K8sFactorRunner(
            **common,
            env=dict(f.env),
            image=f.k8s.image,
            namespace=f.k8s.namespace,
            gpus=f.k8s.gpus,
            cpus=f.k8s.cpus,
            memory=f.k8s.memory,
            volume_claim=f.k8s.volume_claim,
            data_root=str(settings.home),
            workdir=f.k8s.workdir,
        )
    files = dict(python=f.python, env=dict(f.env), exchange_dir=str(settings.home / "pipes"))
    if settings.env == "slurm":
        s = f.slurm
        return SlurmFactorRunner(
            **common,
            **files,
            partition=s.partition,
            gpus=s.gpus,
            cpus=s.cpus,
            time_limit=s.time,
            mem=s.mem,
            extra_args=list(s.extra_args),
            log_dir=str(settings.home / "logs" / "slurm"),
        )
    return SubprocessFactorRunner(**common, **files, launcher=list(f.launcher))


def build_resources(settings: Settings, config: PipelineConfig) -> dict:
    """The resource bindings of ``settings.env``. Add a remote binding here, never in an asset."""
    from dagster_dbt import DbtCliResource

    from resources.mlflow_registry import MlflowRegistry
    from resources.store import ArtifactStore

    return {
        "store": ArtifactStore(home=str(settings.home)),
        "factor_runner": factor_runner(settings),
        "mlflow": MlflowRegistry(
            tracking_uri=settings.mlflow_uri(config),
            artifact_root=str(settings.home / "mlflow" / "artifacts"),
            experiment=config.mlflow.experiment,
        ),
        "dbt": DbtCliResource(
            project_dir=str(DBT_PROJECT_DIR), profiles_dir=str(DBT_PROJECT_DIR), dbt_executable=DBT_EXECUTABLE
        ),
    }
