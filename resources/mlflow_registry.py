"""MLflow tracking and model registry as a Dagster resource (a thin wrapper around ``MlflowClient``).

No global MLflow state: every call builds a client for the configured tracking URI, so several
resources (tests, deployments) can point at different stores in one process. Runs are tagged with the
Dagster run id, so MLflow mirrors Dagster's lineage instead of owning it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from memkfac.registry import CANDIDATE, CHAMPION, experiment_id_for, log_transformers_model, register_version

__all__ = ["CANDIDATE", "CHAMPION", "MlflowRegistry"]


class MlflowRegistry(dg.ConfigurableResource):
    """``tracking_uri``: any MLflow URI (default a sqlite file under MEMKFAC_HOME/mlflow)."""

    tracking_uri: str
    artifact_root: str = (
        ""  # where a new experiment stores artifacts with a local store; a server picks its own
    )
    experiment: str = "memkfac"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

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
        run = client.create_run(
            experiment_id_for(client, self.experiment, self.tracking_uri, self.artifact_root),
            run_name=name,
            tags=dict(tags),
        )
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
                log_transformers_model(client, run_id, Path(model_dir))
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id

    def register(
        self, name: str, run_id: str, tags: Mapping[str, str], aliases: tuple[str, ...] = (CANDIDATE,)
    ) -> str:
        """Register the run's ``model`` artifact as a new version of ``name`` (``memkfac.registry``)
        with ``tags``; move ``aliases`` to it. Returns the version number."""
        return register_version(self.client(), name, f"runs:/{run_id}/model", run_id, tags, aliases)
