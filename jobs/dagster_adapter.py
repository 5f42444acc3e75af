"""What the main job needs from Dagster beyond its public API, in one place.

Dagster has no public way to run automation in process, so these few calls reach past it. Each is
exercised by tests/dagster/test_dagster_adapter.py, which fails when a Dagster upgrade changes one
(verified on dagster 1.13.27); jobs/main.py uses the public API for everything else.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.events import RunFailureReason
from dagster._core.storage.tags import RUN_FAILURE_REASON_TAG


def asset_job(defs: dg.Definitions) -> dg.JobDefinition:
    """The implicit job over every asset (``__ASSET_JOB``), the one the UI launches and re-executes."""
    return defs.resolve_implicit_global_asset_job_def()


def inputs(
    defs: dg.Definitions, instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None
) -> dict[dg.AssetKey, set[str | None]]:
    """Per input asset of ``key[partition]``, the partitions of it that partition reads ({None}: an
    unpartitioned input; empty: a partitioned input with no partitions yet)."""
    graph = defs.resolve_asset_graph()
    read = {}
    with partition_loading_context(dynamic_partitions_store=instance):
        for parent in graph.get(key).parent_keys:
            if graph.get(parent).is_partitioned:
                mapped = graph.get_parent_partition_keys_for_child(partition, parent, key)
                read[parent] = set(mapped.partitions_subset.get_partition_keys())
            else:
                read[parent] = {None}
    return read


def ended_by_interrupt(run: dg.DagsterRun) -> bool:
    """Whether the run was cancelled or ended by an interrupt (Ctrl-C, SIGTERM) inside Dagster."""
    return (
        run.status == dg.DagsterRunStatus.CANCELED
        or run.tags.get(RUN_FAILURE_REASON_TAG) == RunFailureReason.UNEXPECTED_TERMINATION.value
    )


def fail_run(instance: dg.DagsterInstance, run: dg.DagsterRun, message: str) -> None:
    """Mark a run that no process will finish as failed, and free the pool slots it held."""
    instance.report_run_failed(run, message=message)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def instance_dir(instance: dg.DagsterInstance) -> Path:
    """The instance's directory (``$DAGSTER_HOME``), where the main job keeps its automation cursor."""
    return Path(instance.root_directory)
