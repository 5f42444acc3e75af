"""Settings from the environment, read in one place, and the resources bound for each environment.

| variable | default | meaning |
|---|---|---|
| ``MEMKFAC_HOME`` | ``.memkfac`` | data root (models, factors, edits, evals, reports, MLflow store) |
| ``MEMKFAC_CONFIG`` | ``configs/default.yaml`` | the pipeline YAML |
| ``MEMKFAC_ENV`` | ``local`` | factor step: ``local`` (subprocess), ``slurm`` (batch job), ``k8s`` (pod) |
| ``MLFLOW_TRACKING_URI`` | sqlite file under ``$MEMKFAC_HOME/mlflow`` | overrides ``mlflow.tracking_uri`` |

The factor step (``FactorCompute``; the pipeline config's ``compute`` section will replace these):

| variable | default | meaning |
|---|---|---|
| ``MEMKFAC_FACTOR_DEVICE`` | ``cpu`` | ``cpu``, ``cuda``, ``cuda:N``, ``mps``; checked at the step's start |
| ``MEMKFAC_FACTOR_PROCESSES`` | ``1`` | data-parallel processes (``torchrun --nproc-per-node``), a GPU each |
| ``MEMKFAC_FACTOR_PYTHON`` | this interpreter | Python that runs the collection (local and slurm) |
| ``MEMKFAC_FACTOR_LAUNCHER`` | none | local only: command prefix, shell-quoted (``docker run ...``) |
| ``MEMKFAC_FACTOR_ENV`` | none | ``NAME=VALUE`` pairs (shell-quoted) added to the collection's environment |
| ``MEMKFAC_SLURM_PARTITION`` | the cluster's default | ``sbatch --partition`` |
| ``MEMKFAC_SLURM_GPUS`` | processes on cuda, else 0 | ``sbatch --gpus-per-node`` |
| ``MEMKFAC_SLURM_CPUS`` | processes | ``sbatch --cpus-per-task`` |
| ``MEMKFAC_SLURM_TIME`` | ``4:00:00`` | ``sbatch --time`` |
| ``MEMKFAC_SLURM_MEM`` | none | ``sbatch --mem`` (e.g. ``64G``) |
| ``MEMKFAC_SLURM_ARGS`` | none | more ``sbatch`` options, shell-quoted (``--account=x --qos=y``) |
| ``MEMKFAC_K8S_IMAGE`` | required for k8s | image with the project at ``MEMKFAC_K8S_WORKDIR``, and Python |
| ``MEMKFAC_K8S_NAMESPACE`` | the current one | namespace of the pod |
| ``MEMKFAC_K8S_GPUS`` | processes on cuda, else 0 | ``resources.limits["nvidia.com/gpu"]`` |
| ``MEMKFAC_K8S_CPUS`` / ``MEMKFAC_K8S_MEMORY`` | none | CPU / memory requests and limits (``8``, ``64Gi``) |
| ``MEMKFAC_K8S_VOLUME`` | required for k8s | PersistentVolumeClaim holding ``MEMKFAC_HOME`` (same path) |
| ``MEMKFAC_K8S_WORKDIR`` | ``/app`` | the project directory inside the image |

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
from typing import ClassVar

from memkfac.devices import check_device_name
from memkfac.errors import MemkfacError
from memkfac.paths import memkfac_home
from resources.config import PipelineConfig, default_config_path

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
    """Where the factor step runs, on what device and with how many processes: one object, so that the
    pipeline config's ``compute`` section can replace the environment variables in one place."""

    device: str = "cpu"
    processes: int = 1
    python: str = sys.executable
    launcher: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    k8s: K8sSettings = field(default_factory=K8sSettings)

    # what the errors raised where the step runs call each setting
    SETTING_NAMES: ClassVar[dict[str, str]] = {
        "device": "MEMKFAC_FACTOR_DEVICE",
        "processes": "MEMKFAC_FACTOR_PROCESSES",
        "partition": "MEMKFAC_SLURM_PARTITION",
        "time": "MEMKFAC_SLURM_TIME",
        "mem": "MEMKFAC_SLURM_MEM",
    }

    @classmethod
    def from_env(cls, env: str, environ: Mapping[str, str] = os.environ) -> FactorCompute:
        """Read and check the factor step's settings for ``MEMKFAC_ENV=env``; errors name the variable."""
        device = check_device_name(environ.get("MEMKFAC_FACTOR_DEVICE", "cpu"), "MEMKFAC_FACTOR_DEVICE")
        processes = _int(environ, "MEMKFAC_FACTOR_PROCESSES", 1, minimum=1)
        if processes > 1 and device != "cuda" and device.startswith("cuda"):
            raise MemkfacError(
                f"MEMKFAC_FACTOR_DEVICE is {device!r} with MEMKFAC_FACTOR_PROCESSES={processes}: each "
                "process takes its own GPU (process r uses cuda:r)",
                "set MEMKFAC_FACTOR_DEVICE=cuda, or MEMKFAC_FACTOR_PROCESSES=1 to use that one GPU",
            )
        launcher = parse_launcher(environ.get("MEMKFAC_FACTOR_LAUNCHER", ""))
        if launcher and env != "local":
            raise MemkfacError(
                f"MEMKFAC_FACTOR_LAUNCHER is set with MEMKFAC_ENV={env}, where it has no meaning",
                "unset MEMKFAC_FACTOR_LAUNCHER: the job's resources come from the MEMKFAC_SLURM_* or "
                "MEMKFAC_K8S_* variables",
            )
        gpus_default = processes if device.startswith("cuda") else 0
        slurm = SlurmSettings(
            partition=environ.get("MEMKFAC_SLURM_PARTITION") or None,
            gpus=_int(environ, "MEMKFAC_SLURM_GPUS", gpus_default, minimum=0),
            cpus=_int(environ, "MEMKFAC_SLURM_CPUS", processes, minimum=1),
            time=environ.get("MEMKFAC_SLURM_TIME", "4:00:00"),
            mem=environ.get("MEMKFAC_SLURM_MEM") or None,
            extra_args=tuple(_split(environ.get("MEMKFAC_SLURM_ARGS", ""), "MEMKFAC_SLURM_ARGS")),
        )
        k8s = K8sSettings(
            image=environ.get("MEMKFAC_K8S_IMAGE") or None,
            namespace=environ.get("MEMKFAC_K8S_NAMESPACE") or None,
            gpus=_int(environ, "MEMKFAC_K8S_GPUS", gpus_default, minimum=0),
            cpus=environ.get("MEMKFAC_K8S_CPUS") or None,
            memory=environ.get("MEMKFAC_K8S_MEMORY") or None,
            volume_claim=environ.get("MEMKFAC_K8S_VOLUME") or None,
            workdir=environ.get("MEMKFAC_K8S_WORKDIR", "/app"),
        )
        if env == "slurm":
            if shutil.which("sbatch") is None:
                raise MemkfacError(
                    "MEMKFAC_ENV=slurm but sbatch is not on PATH (no Slurm client on this machine)",
                    "run Dagster where Slurm's client tools are, or try a one-node cluster here: "
                    "sudo scripts/slurm-local.sh start",
                )
            _enough_gpus(device, processes, slurm.gpus, "MEMKFAC_SLURM_GPUS")
        if env == "k8s":
            missing = [
                v
                for v, x in (("MEMKFAC_K8S_IMAGE", k8s.image), ("MEMKFAC_K8S_VOLUME", k8s.volume_claim))
                if not x
            ]
            if missing:
                raise MemkfacError(
                    f"MEMKFAC_ENV=k8s needs {' and '.join(missing)}",
                    "set MEMKFAC_K8S_IMAGE to an image holding the project (at MEMKFAC_K8S_WORKDIR) and "
                    "MEMKFAC_K8S_VOLUME to the PersistentVolumeClaim that holds MEMKFAC_HOME",
                )
            _enough_gpus(device, processes, k8s.gpus, "MEMKFAC_K8S_GPUS")
        return cls(
            device=device,
            processes=processes,
            python=environ.get("MEMKFAC_FACTOR_PYTHON", sys.executable),
            launcher=launcher,
            env=parse_env_pairs(environ.get("MEMKFAC_FACTOR_ENV", "")),
            slurm=slurm,
            k8s=k8s,
        )


@dataclass(frozen=True)
class Settings:
    home: Path
    config_path: Path
    env: str
    factor: FactorCompute = field(default_factory=FactorCompute)

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment; raise MemkfacError naming the variable that is wrong."""
        env = os.environ.get("MEMKFAC_ENV", "local")
        if env not in ENVIRONMENTS:
            raise MemkfacError(
                f"MEMKFAC_ENV is {env!r}, which has no resource binding",
                f"use one of {', '.join(ENVIRONMENTS)}",
            )
        return cls(
            home=memkfac_home(),
            config_path=Path(os.environ.get("MEMKFAC_CONFIG", default_config_path())).resolve(),
            env=env,
            factor=FactorCompute.from_env(env),
        )

    def mlflow_uri(self, config: PipelineConfig) -> str:
        return (
            os.environ.get("MLFLOW_TRACKING_URI")
            or config.mlflow.tracking_uri
            or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        )


def _split(value: str, variable: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as e:
        raise MemkfacError(f"{variable} is not shell-quoted correctly ({e})", "close the quotes") from None


def _int(environ: Mapping[str, str], variable: str, default: int, minimum: int) -> int:
    value = environ.get(variable, "").strip()
    if not value:
        return default
    if not re.fullmatch(r"-?\d+", value) or int(value) < minimum:
        raise MemkfacError(
            f"{variable} is {value!r}, not a whole number >= {minimum}",
            f"set {variable} to e.g. {max(minimum, 1)}",
        )
    return int(value)


def _enough_gpus(device: str, processes: int, gpus: int, variable: str) -> None:
    if device.startswith("cuda") and gpus < processes:
        raise MemkfacError(
            f"{variable}={gpus} GPUs for MEMKFAC_FACTOR_PROCESSES={processes} processes on {device}",
            f"request one GPU per process: {variable}={processes} (or unset it)",
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
    common = dict(device=f.device, processes=f.processes, setting_names=FactorCompute.SETTING_NAMES)
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
