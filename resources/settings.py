"""Settings from the environment, read in one place, and the resources bound for each environment.

| variable | default | meaning |
|---|---|---|
| ``MEMKFAC_HOME`` | ``.memkfac`` | data root (models, factors, edits, evals, reports, MLflow store) |
| ``MEMKFAC_CONFIG`` | ``configs/default.yaml`` | the pipeline YAML |
| ``MEMKFAC_ENV`` | ``local`` | resource binding: ``local`` (this machine) |
| ``MEMKFAC_FACTOR_PYTHON`` | this interpreter | Python that runs the factor collection subprocess |
| ``MEMKFAC_FACTOR_LAUNCHER`` | none | command prefix for that subprocess, shell-quoted: ``srun --gpus=1`` |
| ``MEMKFAC_FACTOR_ENV`` | none | ``NAME=VALUE`` pairs (shell-quoted) added to its environment |
| ``MLFLOW_TRACKING_URI`` | sqlite file under ``$MEMKFAC_HOME/mlflow`` | overrides ``mlflow.tracking_uri`` |

The factor runner runs ``LAUNCHER... PYTHON resources/pipes_collect_factors.py`` in the project
directory: on a Slurm cluster ``MEMKFAC_FACTOR_LAUNCHER="srun --gpus=1 --time=4:00:00"`` collects the
factors on a GPU node, given a shared disk for the project, the interpreter and ``MEMKFAC_HOME``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from memkfac.errors import MemkfacError
from memkfac.paths import memkfac_home
from resources.config import PipelineConfig, default_config_path

PROJECT_DIR = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = PROJECT_DIR / "dbt_reports"
# dbt-core installs its `dbt` script next to this interpreter; PATH may not include the venv.
DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")


@dataclass(frozen=True)
class Settings:
    home: Path
    config_path: Path
    env: str
    factor_python: str
    factor_launcher: tuple[str, ...] = ()
    factor_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment; raise MemkfacError naming the variable that is wrong."""
        return cls(
            home=memkfac_home(),
            config_path=Path(os.environ.get("MEMKFAC_CONFIG", default_config_path())).resolve(),
            env=os.environ.get("MEMKFAC_ENV", "local"),
            factor_python=os.environ.get("MEMKFAC_FACTOR_PYTHON", sys.executable),
            factor_launcher=parse_launcher(os.environ.get("MEMKFAC_FACTOR_LAUNCHER", "")),
            factor_env=parse_env_pairs(os.environ.get("MEMKFAC_FACTOR_ENV", "")),
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


def build_resources(settings: Settings, config: PipelineConfig) -> dict:
    """The resource bindings of ``settings.env``. Add a remote binding here, never in an asset."""
    from dagster_dbt import DbtCliResource

    from resources.factor_runner import SubprocessFactorRunner
    from resources.mlflow_registry import MlflowRegistry
    from resources.store import ArtifactStore

    if settings.env != "local":
        raise MemkfacError(
            f"MEMKFAC_ENV={settings.env!r} has no resource binding",
            "use MEMKFAC_ENV=local, or add a binding (e.g. a Kubernetes factor runner) in build_resources",
        )
    store = ArtifactStore(home=str(settings.home))
    return {
        "store": store,
        "factor_runner": SubprocessFactorRunner(
            python=settings.factor_python,
            launcher=list(settings.factor_launcher),
            env=dict(settings.factor_env),
            exchange_dir=str(settings.home / "pipes"),
        ),
        "mlflow": MlflowRegistry(
            tracking_uri=settings.mlflow_uri(config),
            artifact_root=str(settings.home / "mlflow" / "artifacts"),
            experiment=config.mlflow.experiment,
        ),
        "dbt": DbtCliResource(
            project_dir=str(DBT_PROJECT_DIR), profiles_dir=str(DBT_PROJECT_DIR), dbt_executable=DBT_EXECUTABLE
        ),
    }
