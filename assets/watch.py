"""The resurgence watch: one evaluation of a registered fine-tune per ``registry_version`` partition.

The ``registry_watch`` sensor (jobs/sensors.py) adds a partition ``<registered model>/<version>`` for
every registered version downstream of an edit (``memkfac.registry.watched_versions``) and requests
its run. ``watch_history`` evaluates it (``memkfac.watch.watch_version``) and appends one row to the
history table; its check fails when the version recites more removed canaries than
``watch.max_recall_pct`` allows, and names the version.
"""

import dagster as dg

from resources.config import PipelineConfig
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "watch"
WATCH_ASSET = "watch_history"
RECALL_CHECK = "removed_canaries_stay_removed"
REGISTRY_VERSIONS = dg.DynamicPartitionsDefinition(name="registry_version")


def partition_key(name: str, version: str) -> str:
    return f"{name}/{version}"


def build(config: PipelineConfig, parts=None) -> list:
    limit = config.watch.max_recall_pct

    @dg.asset(
        name=WATCH_ASSET,
        partitions_def=REGISTRY_VERSIONS,
        group_name=GROUP,
        kinds={"mlflow", "parquet"},
        code_version="watch-v1",
        # new evaluations come from the sensor; a new watch code version re-evaluates (appends) them all
        automation_condition=dg.AutomationCondition.code_version_changed().with_label("watch_code_changed"),
        pool="compute",
        check_specs=[
            dg.AssetCheckSpec(
                RECALL_CHECK,
                asset=WATCH_ASSET,
                description=f"Strict recall of the removed canaries is at most {limit}% "
                "(watch.max_recall_pct); a version that could not be evaluated warns.",
            )
        ],
        description="A registered fine-tune of an edit, pulled by URI and evaluated on the probe set its "
        "edit removed: strict/loose recall on removed and control canaries, perplexity, MIA AUC. Appends "
        "one row to evals/watch_history (never overwritten).",
    )
    def watch_history(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.watch import OK, WatchInputs, watch_version

        name, _, version = context.partition_key.rpartition("/")
        inputs = WatchInputs(
            store.validated_probes, store.corpus_dir, config.evaluation.arguments.heldout_blocks
        )
        row = watch_version(
            mlflow.tracking_uri,
            name,
            version,
            inputs,
            config.watch,
            eval_args=config.evaluation.arguments,
            root=store.root,
        )
        uri = f"models:/{name}/{version}"
        if row["status"] != OK:
            check = dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{uri} was not evaluated ({row['status']}): {row['message']}",
            )
        else:
            check = dg.AssetCheckResult(
                passed=not row["alert"],
                description=f"{uri} recites {row['removed_strict_k']} of {row['removed_n']} removed "
                f"canaries ({row['removed_strict_pct']:.1f}%, limit {limit}%)",
            )
        return dg.MaterializeResult(
            metadata={
                k: v
                for k, v in row.items()
                if k != "evaluated_at" and v is not None and not isinstance(v, bool)
            }
            | {"alert": row["alert"], "dagster/row_count": 1},
            check_results=[check],
        )

    return [watch_history]
