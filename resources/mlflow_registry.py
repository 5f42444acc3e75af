"""MLflow tracking and model registry as a Dagster resource (a thin wrapper around ``MlflowClient``).

No global MLflow state: every call builds a client for the configured tracking URI, so several
resources (tests, deployments) can point at different stores in one process. Runs are tagged with the
Dagster run id, so MLflow mirrors Dagster's lineage instead of owning it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

CANDIDATE = "candidate"  # alias of the newest version of an edited model
CHAMPION = "champion"  # alias of the version chosen by the reports (lowest recall within the utility budget)


class MlflowRegistry(dg.ConfigurableResource):
    """``tracking_uri``: any MLflow URI (default a sqlite file under MEMKFAC_HOME/mlflow)."""

    tracking_uri: str
    artifact_root: str = ""  # where a new experiment stores artifacts; empty = the server's default
    experiment: str = "memkfac"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = Path(self.artifact_root).as_uri() if self.artifact_root else None
        return client.create_experiment(self.experiment, artifact_location=location)

    def log_run(
        self,
        name: str,
        params: Mapping[str, object],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: Mapping[str, Path] = {},
        model_dir: Path | None = None,
    ) -> str:
        """Log one finished run; ``artifacts`` maps artifact folders to local files or directories.

        ``model_dir`` (a Hugging Face checkpoint) is logged in the transformers flavor under ``model``.
        Returns the run id.
        """
        client = self.client()
        run = client.create_run(self._experiment_id(client), run_name=name, tags=dict(tags))
        run_id = run.info.run_id
        try:
            for k, v in params.items():
                client.log_param(run_id, k, str(v)[:6000])
            for k, v in metrics.items():
                if v is not None:
                    client.log_metric(run_id, k, float(v))
            for folder, path in artifacts.items():
                path = Path(path)
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), folder)
                else:
                    client.log_artifact(run_id, str(path), folder)
            if model_dir is not None:
                self._log_transformers_model(client, run_id, Path(model_dir))
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id

    @staticmethod
    def _log_transformers_model(client, run_id: str, model_dir: Path) -> None:
        import mlflow.transformers
        import torch
        import transformers

        from memkfac.models import load_model

        # The dict form, not a checkpoint path: mlflow 3.17's path form breaks on transformers 5.
        model, tokenizer = load_model(model_dir)
        with tempfile.TemporaryDirectory(prefix="memkfac-mlflow-") as tmp:
            out = Path(tmp) / "model"
            mlflow.transformers.save_model(
                {"model": model, "tokenizer": tokenizer},
                str(out),
                task="text-generation",
                # explicit: inferring them imports optional packages (torchvision) that are not installed
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}",
                ],
            )
            client.log_artifacts(run_id, str(out), "model")

    def register(
        self, name: str, run_id: str, aliases: tuple[str, ...] = (CANDIDATE,), tags: Mapping = {}
    ) -> str:
        """Register the run's ``model`` artifact as a new version of ``name``; move ``aliases`` to it."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        version = client.create_model_version(
            name, f"runs:/{run_id}/model", run_id=run_id, tags=dict(tags)
        ).version
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
        return str(version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(name, alias, version)
