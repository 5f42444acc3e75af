"""jobs/dagster_adapter.py against the pinned Dagster: the private symbols it reaches exist with the
signatures it calls, and each adapter function does what the main job relies on, on a small graph.

A failure here after a Dagster upgrade means: read the upgrade's changes to these symbols, mend the
adapter (or replace it with a public API that now exists), then rerun the main job's tests.
"""

import inspect
import os
import signal
import time

import dagster as dg

from jobs import dagster_adapter as adapter

MODELS = dg.StaticPartitionsDefinition(["a", "b"])
VARIANTS = dg.StaticPartitionsDefinition(["a__x", "a__y", "b__x"])
PROBES = dg.DynamicPartitionsDefinition(name="adapter_probes")
CELLS = dg.MultiPartitionsDefinition({"probe": PROBES, "variant": VARIANTS})
EMPTY = dg.DynamicPartitionsDefinition(name="adapter_empty")


@dg.asset(partitions_def=MODELS)
def base() -> None: ...


@dg.asset(
    partitions_def=VARIANTS,
    deps=[
        dg.AssetDep(base, partition_mapping=dg.StaticPartitionMapping({"a": ["a__x", "a__y"], "b": ["b__x"]}))
    ],
)
def edited() -> None: ...


@dg.asset(partitions_def=PROBES)
def probes() -> None: ...


@dg.asset(partitions_def=CELLS, deps=[edited, probes])
def cells() -> None: ...


@dg.asset(partitions_def=EMPTY)
def nothing_yet() -> None: ...


@dg.asset(deps=[cells, nothing_yet])
def report() -> None: ...


@dg.asset(deps=[report])
def summary() -> None: ...


@dg.asset
def raises() -> None:
    raise RuntimeError("a failed step")


@dg.asset
def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)  # Dagster turns the signal into an interrupt of this step well before


DEFS = dg.Definitions(assets=[base, edited, probes, cells, nothing_yet, report, summary, raises, ctrl_c])


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_private_symbols_have_the_signatures_the_adapter_calls():
    from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph
    from dagster._core.instance import DagsterInstance
    from dagster._core.storage.event_log.base import EventLogStorage

    assert _parameters(dg.Definitions.resolve_implicit_global_asset_job_def) == ["self"]
    assert _parameters(dg.Definitions.resolve_asset_graph) == ["self"]
    assert _parameters(BaseAssetGraph.get_parent_partition_keys_for_child)[:4] == [
        "self",
        "partition_key",
        "parent_asset_key",
        "child_asset_key",
    ]
    assert "dynamic_partitions_store" in _parameters(adapter.partition_loading_context)
    assert _parameters(DagsterInstance.report_run_failed)[:3] == ["self", "dagster_run", "message"]
    assert _parameters(EventLogStorage.free_concurrency_slots_for_run) == ["self", "run_id"]
    assert isinstance(DagsterInstance.root_directory, property)
    assert adapter.RUN_FAILURE_REASON_TAG == "dagster/failure_reason"
    assert adapter.RunFailureReason.UNEXPECTED_TERMINATION.value == "UNEXPECTED_TERMINATION"


def test_inputs_maps_each_partition_to_the_partitions_it_reads(tmp_path):
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    instance.add_dynamic_partitions(PROBES.name, ["p1", "p2"])
    key = dg.AssetKey
    assert adapter.inputs(DEFS, instance, key("edited"), "a__y") == {key("base"): {"a"}}
    assert adapter.inputs(DEFS, instance, key("cells"), "p2|b__x") == {
        key("edited"): {"b__x"},
        key("probes"): {"p2"},
    }
    # a fan-in reads every partition; a partitioned input with none yet reads nothing
    read = adapter.inputs(DEFS, instance, key("report"), None)
    assert read[key("cells")] == {f"{p}|{v}" for p in ("p1", "p2") for v in ("a__x", "a__y", "b__x")}
    assert read[key("nothing_yet")] == set()
    assert adapter.inputs(DEFS, instance, key("summary"), None) == {key("report"): {None}}


def test_asset_job_runs_a_selection_and_ended_by_interrupt_tells_ctrl_c_from_a_failure(tmp_path):
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    job = adapter.asset_job(DEFS)
    ok = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("base")], partition_key="a")
    assert ok.success and instance.get_run_by_id(ok.run_id).job_name == job.name
    failed = job.execute_in_process(instance=instance, asset_selection=[raises.key], raise_on_error=False)
    interrupted = job.execute_in_process(
        instance=instance, asset_selection=[ctrl_c.key], raise_on_error=False
    )
    assert not adapter.ended_by_interrupt(instance.get_run_by_id(ok.run_id))
    assert not adapter.ended_by_interrupt(instance.get_run_by_id(failed.run_id))
    assert adapter.ended_by_interrupt(instance.get_run_by_id(interrupted.run_id))
    canceled = dg.DagsterRun(job_name=job.name, run_id="canceled", status=dg.DagsterRunStatus.CANCELED)
    assert adapter.ended_by_interrupt(canceled)


def test_fail_run_marks_it_failed_and_frees_its_pool_slots(tmp_path):
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    assert adapter.instance_dir(instance) == tmp_path
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    run = dg.DagsterRun(job_name="__ASSET_JOB", run_id="orphan", status=dg.DagsterRunStatus.STARTED)
    instance.add_run(run)
    storage.claim_concurrency_slot("gpu", "orphan", "edited")
    assert storage.get_concurrency_info("gpu").active_slot_count == 1

    adapter.fail_run(instance, run, "the process that ran it is gone")

    assert instance.get_run_by_id("orphan").status == dg.DagsterRunStatus.FAILURE
    assert storage.get_concurrency_info("gpu").active_slot_count == 0
