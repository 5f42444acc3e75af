"""Settings from the environment, read in one place, and the resources bound for each environment.

| variable | default | meaning |
|---|---|---|
| ``MEMKFAC_HOME`` | ``.memkfac`` | data root (models, factors, edits, evals, reports, MLflow store) |
| ``MEMKFAC_CONFIG`` | ``configs/default.yaml`` | the pipeline YAML |
| ``MEMKFAC_ENV`` | ``local`` | resource binding: ``local`` (this machine) |
| ``MEMKFAC_FACTOR_PYTHON`` | this interpreter | Python that runs the factor collection subprocess |
| ``MLFLOW_TRACKING_URI`` | sqlite file under ``$MEMKFAC_HOME/mlflow`` | overrides ``mlflow.tracking_uri`` |
"""

from __future__ import annotations

import os
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

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            home=memkfac_home(),
            config_path=Path(os.environ.get("MEMKFAC_CONFIG", default_config_path())).resolve(),
            env=os.environ.get("MEMKFAC_ENV", "local"),
            factor_python=os.environ.get("MEMKFAC_FACTOR_PYTHON", sys.executable),
        )

    def mlflow_uri(self, config: PipelineConfig) -> str:
        return (
            os.environ.get("MLFLOW_TRACKING_URI")
            or config.mlflow.get("tracking_uri")
            or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        )


def build_resources(settings: Settings, config: PipelineConfig) -> dict:
    """The resource bindings of ``settings.env``. Add a remote binding here, never in an asset."""
    from dagster_dbt import DbtCliResource

    from resources.factor_runner import LocalFactorRunner
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
        "factor_runner": LocalFactorRunner(python=settings.factor_python),
        "mlflow": MlflowRegistry(
            tracking_uri=settings.mlflow_uri(config),
            artifact_root=str(settings.home / "mlflow" / "artifacts"),
            experiment=config.mlflow.get("experiment", "memkfac"),
        ),
        "dbt": DbtCliResource(
            project_dir=str(DBT_PROJECT_DIR), profiles_dir=str(DBT_PROJECT_DIR), dbt_executable=DBT_EXECUTABLE
        ),
    }
