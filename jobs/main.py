"""The main job: materialize the whole graph of the pipeline config, in process, and say where to look.

    python -m jobs.main                     # the embedded default (configs/default.yaml)
    MEMKFAC_CONFIG=configs/tiny.yaml python -m jobs.main

Each round reports the input files as observations, evaluates every automation condition once and
executes what they request: what the automation sensor would run. When they request nothing more,
it also requests every asset partition that is still missing or whose last execution failed, once
its inputs exist, so a rerun completes what an interrupted or failed invocation left (the conditions
count a requested partition as handled even if its run never finished). Execution is in dependency
order, one run per level and partition; a step that reads a failed one is skipped. It stops when
nothing more is requested and exits with status 0 only if the whole graph is materialized (1 names
the failed steps). So a second run after a change recomputes only what the change touched (the
canary injection stays cached). Ctrl-C (or SIGTERM) stops at once with status 130; rerunning the
same command resumes, also after a kill -9: runs a killed main job left unfinished are marked failed
and their pool slots freed first. Runs land in the Dagster instance at ``$DAGSTER_HOME`` (default
``$MEMKFAC_HOME/dagster``), so ``dagster dev`` shows them afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

MAX_ROUNDS = 20  # the graph is 11 levels deep; each round settles at least one level
CURSOR_FILE = "memkfac_automation_cursor.json"  # under DAGSTER_HOME: what automation already handled
PID_TAG = "memkfac/main_job_process"  # on every run the main job executes: "host:pid" of the process


def dagster_home(memkfac_home: Path) -> Path:
    """``$DAGSTER_HOME`` (default ``$MEMKFAC_HOME/dagster``), with dagster.yaml.example's settings
    (one slot per pool: dbt stays the only DuckDB writer) unless a dagster.yaml is already there."""
    import shutil

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(memkfac_home / "dagster"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(
            Path(__file__).resolve().parent.parent / "dagster.yaml.example", home / "dagster.yaml"
        )
    return home


def observe_inputs(defs, instance, store, cursor: str | None) -> str:
    """One tick of the input-files sensor, applied: observations reported, probe sets registered.

    Returns the sensor's new cursor.
    """
    from dagster import build_sensor_context

    from jobs.sensors import SENSOR_NAME

    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    context = build_sensor_context(
        instance=instance, cursor=cursor, resources={"store": store}, definitions=defs
    )
    result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result.cursor


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C, or a run that ended interrupted; ``step`` names what was running (None: between runs)."""

    def __init__(self, step: str | None):
        super().__init__(step)
        self.step = step


def step_name(step) -> str:
    """``asset[partition]`` of an ``AssetKeyPartitionKey``."""
    name = step.asset_key.to_user_string()
    return f"{name}[{step.partition_key}]" if step.partition_key else name


def completion_defs(defs):
    """``defs`` with one condition on every asset: missing or last execution failed, inputs present.

    Evaluated when the real conditions are quiet, it finds what an interrupted or failed earlier
    invocation left undone: eager conditions count a requested partition as handled even if its run
    never finished, so they never request it again.
    """
    import dagster as dg

    ac = dg.AutomationCondition
    incomplete = (
        (ac.missing() | ac.execution_failed()) & ~ac.any_deps_missing() & ~ac.in_progress()
    ).with_label("missing_or_failed")
    # the permissive variant leaves the observable sources (SourceAsset objects) as they are
    return defs.permissive_map_resolved_asset_specs(
        func=lambda spec: spec.replace_attributes(automation_condition=incomplete), selection=None
    )


def requested_steps(result, graph) -> set:
    """The asset partitions (``AssetKeyPartitionKey``) an automation evaluation requested."""
    from dagster._core.definitions.events import AssetKeyPartitionKey

    return {
        AssetKeyPartitionKey(key, p or None)
        for key in graph.materializable_asset_keys
        if result.get_num_requested(key)
        for p in result.get_requested_partitions(key)
    }


def incomplete_steps(completion, instance, attempted: set, failed: set, now: dt.datetime) -> set:
    """What ``completion_defs`` requests, less what this invocation already ran (a failure is
    attempted once per invocation), what lies downstream of a partitioned asset with no partitions
    yet (no probe set registered: a report would read no files), and what reads a failed or
    left-out step.
    """
    import dagster as dg

    graph = completion.resolve_asset_graph()
    empty = [
        key
        for key in graph.materializable_asset_keys
        if graph.get(key).partitions_def
        and not graph.get(key).partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    ]
    blocked = dg.AssetSelection.keys(*empty).downstream().resolve(graph) if empty else set()
    result = dg.evaluate_automation_conditions(defs=completion, instance=instance, evaluation_time=now)
    candidates = requested_steps(result, graph)
    kept, left_out = set(), set(failed)
    for level in graph.toposorted_asset_keys_by_level:  # parents first: leaving out propagates
        for step in (s for s in candidates if s.asset_key in level):
            if step in attempted or step.asset_key in blocked or _reads(graph, instance, step, left_out):
                left_out.add(step)
            else:
                kept.add(step)
    return kept


def _reads(graph, instance, step, steps: set) -> bool:
    """Whether ``step`` reads an asset partition in ``steps``."""
    from dagster._core.definitions.partitions.context import partition_loading_context

    with partition_loading_context(dynamic_partitions_store=instance):
        parents = graph.get_parents_partitions(step.asset_key, step.partition_key).parent_partitions
    return not steps.isdisjoint(parents)


def _never_materialized(graph, instance) -> list[str]:
    """One problem line naming what is still unmaterialized although nothing failed (an input file
    such as a model directory is missing, so nothing requests what reads it), or []."""
    from dagster._core.definitions.events import AssetKeyPartitionKey

    missing = []
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable:
            continue
        if node.partitions_def:
            done = instance.get_materialized_partitions(key)
            partitions = node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            missing += [AssetKeyPartitionKey(key, p) for p in partitions if p not in done]
        elif instance.get_latest_materialization_event(key) is None:
            missing.append(AssetKeyPartitionKey(key, None))
    if not missing:
        return []
    names = ", ".join(step_name(s) for s in missing[:5]) + (
        f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    )
    return [f"never materialized, an input is missing: {names}"]


def fail_abandoned_runs(instance, log=print) -> None:
    """Mark as failed the runs a killed main job left unfinished (SIGKILL, power loss), and free
    the pool slots they held.

    Left as they are they look in progress for ever (no condition requests an asset partition that
    is in progress), and a step of the same pool waits for ever for the slot. A run counts as
    abandoned when the process named by its PID_TAG ran on this host and is gone.
    """
    import dagster as dg

    unfinished = instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
    )
    for run in unfinished:
        host, _, pid = run.tags.get(PID_TAG, "").rpartition(":")
        if host == socket.gethostname() and not _process_alive(int(pid)):
            assets = ", ".join(sorted(k.to_user_string() for k in run.asset_selection or ()))
            log(f"  run {run.run_id[:8]} ({assets}) was left unfinished by a killed main job: marked failed")
            instance.report_run_failed(run, message="the main job that ran it was killed")
            if instance.event_log_storage.supports_global_concurrency_limits:  # its pool slots too
                instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _interrupted(instance, run_id: str) -> bool:
    """Whether the run was cancelled or ended by an interrupt (Ctrl-C, DagsterExecutionInterruptedError)."""
    import dagster as dg
    from dagster._core.events import RunFailureReason
    from dagster._core.storage.tags import RUN_FAILURE_REASON_TAG

    run = instance.get_run_by_id(run_id)
    return (
        run.status == dg.DagsterRunStatus.CANCELED
        or run.tags.get(RUN_FAILURE_REASON_TAG) == RunFailureReason.UNEXPECTED_TERMINATION.value
    )


def _succeeded(result) -> set:
    """Asset keys the run materialized and whose blocking checks did not fail."""
    import dagster as dg

    done = {e.asset_key for e in result.get_asset_materialization_events()}
    blocked = {
        c.asset_key
        for c in result.get_asset_check_evaluations()
        if c.blocking and not c.passed and c.severity == dg.AssetCheckSeverity.ERROR
    }
    return done - blocked


def execute_requested(defs, instance, requested: set, failed: frozenset = frozenset(), log=print) -> dict:
    """Execute the requested ``AssetKeyPartitionKey`` steps in dependency order, one run per level and
    partition; return ``{step: success}`` of those that ran.

    A step that reads a ``failed`` step, or one that failed or was skipped earlier in this call, is
    skipped. Raises PipelineInterrupted as soon as a run ends interrupted: nothing after it starts.
    """
    from dagster._core.definitions.events import AssetKeyPartitionKey

    graph = defs.resolve_asset_graph()
    job = defs.resolve_implicit_global_asset_job_def()
    outcomes, unusable = {}, set(failed)
    for level in graph.toposorted_asset_keys_by_level:
        # one run per (partitions definition, key): a run's assets must share their partitioning
        by_partition = defaultdict(list)
        for step in sorted((s for s in requested if s.asset_key in level), key=str):
            if _reads(graph, instance, step, unusable):
                log(f"  {step_name(step)}: skipped, an input failed")
                unusable.add(step)
            else:
                partitions_def = graph.get(step.asset_key).partitions_def
                by_partition[(id(partitions_def), step.partition_key)].append(step.asset_key)
        for (_, partition), keys in sorted(by_partition.items(), key=lambda kv: str(kv[0][1])):
            names = ", ".join(k.to_user_string() for k in keys)
            label = f"{names}[{partition}]" if partition else names
            start = time.perf_counter()
            try:
                result = job.execute_in_process(
                    instance=instance,
                    asset_selection=keys,
                    partition_key=partition,
                    raise_on_error=False,
                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                    tags={PID_TAG: _this_process()},
                )
            except KeyboardInterrupt:  # before Dagster captured the signal: no run to inspect
                raise PipelineInterrupted(label) from None
            seconds = time.perf_counter() - start
            if _interrupted(instance, result.run_id):
                log(f"  {label}: INTERRUPTED after {seconds:.1f}s")
                raise PipelineInterrupted(label)
            succeeded = _succeeded(result)
            bad = [k.to_user_string() for k in keys if k not in succeeded]
            log(f"  {label}: {'FAILED ' + ', '.join(bad) if bad else 'ok'} in {seconds:.1f}s")
            for key in keys:
                step = AssetKeyPartitionKey(key, partition)
                outcomes[step] = key in succeeded
                if key in succeeded:
                    unusable.discard(step)  # a retry of an earlier failure
                else:
                    unusable.add(step)
    return outcomes


def run_pipeline(defs, instance, store, log=print) -> list[str]:
    """Run rounds until nothing more is requested; return the failed steps (empty on success).

    A round executes what the automation conditions request; when they request nothing, what
    ``incomplete_steps`` finds. A step that failed in this invocation is retried only when
    automation requests it again (a dbt report whose sibling report was still missing). The
    automation cursor is kept in the Dagster home between invocations, like the daemon keeps its
    own, so conditions such as "an upstream's data version changed since last handled" carry over;
    it is saved once a round has run, so the next invocation requests an interrupted round again.
    Raises PipelineInterrupted.
    """
    from dagster import evaluate_automation_conditions
    from dagster_shared.serdes import deserialize_value, serialize_value

    from memkfac.paths import atomic_file

    cursor_file = Path(instance.root_directory) / CURSOR_FILE
    cursor = deserialize_value(cursor_file.read_text()) if cursor_file.is_file() else None
    graph = defs.resolve_asset_graph()
    completion = completion_defs(defs)
    fail_abandoned_runs(instance, log)
    sensor_cursor, attempted, failed = None, set(), set()
    try:
        for round_no in range(1, MAX_ROUNDS + 1):
            sensor_cursor = observe_inputs(defs, instance, store, sensor_cursor)
            now = dt.datetime.now(dt.UTC)
            result = evaluate_automation_conditions(
                defs=defs, instance=instance, cursor=cursor, evaluation_time=now
            )
            requested, why = requested_steps(result, graph), "requested"
            if not requested:
                requested = incomplete_steps(completion, instance, attempted, failed, now)
                why = "still missing or failed"
            if requested:
                log(f"round {round_no}: {len(requested)} asset partitions {why}")
                outcomes = execute_requested(defs, instance, requested, frozenset(failed), log)
                attempted |= outcomes.keys()
                failed = (failed - outcomes.keys()) | {s for s, ok in outcomes.items() if not ok}
            cursor = result.cursor
            with atomic_file(cursor_file) as tmp:
                tmp.write_text(serialize_value(cursor))
            if not requested:
                return sorted(step_name(s) for s in failed) or _never_materialized(graph, instance)
    except PipelineInterrupted:
        raise
    except KeyboardInterrupt:  # between runs (observing inputs, evaluating conditions)
        raise PipelineInterrupted(None) from None
    return sorted(step_name(s) for s in failed) + [f"still requesting after {MAX_ROUNDS} rounds"]


def report_table(store) -> str:
    """The recall-vs-perplexity report, read from the DuckDB file dbt wrote (read-only)."""
    import duckdb

    if not store.duckdb_path.is_file():
        return "(no report database yet)"
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        cursor = con.execute(
            "select variant, probe_set, round(strict_pct, 1), round(loose_pct, 1), "
            "round(base_strict_pct, 1), round(perplexity, 2), round(100 * perplexity_increase, 1), "
            "round(ndcg, 3) "
            "from main_reports.recall_vs_perplexity order by probe_set, variant"
        )
        rows = cursor.fetchall()
    header = (
        "variant",
        "probe set",
        "strict %",
        "loose %",
        "base strict %",
        "perplexity",
        "ppl +%",
        "nDCG@10",
    )
    cells = [header] + [tuple("" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return (
        "Recall on held-out memorized probes vs utility (main_reports.recall_vs_perplexity):\n"
        + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.main",
        description="Materialize the whole memkfac pipeline (MEMKFAC_CONFIG, default configs/default.yaml) "
        "offline on this machine, then print where to look at the results.",
    )
    parser.parse_args(argv)
    import warnings

    from dagster import BetaWarning, PreviewWarning

    from memkfac.errors import MemkfacError

    # The pinned Dagster marks APIs this project relies on as beta/preview; say so once, not per tick.
    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    # SIGTERM (kill, a CI timeout) stops like Ctrl-C; Dagster does the same inside its runs
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    try:
        from dagster import DagsterInstance

        from definitions import build_definitions
        from resources.config import load_config
        from resources.settings import Settings
        from resources.store import ArtifactStore

        settings = Settings.from_env()
        config = load_config(settings.config_path)
        home = dagster_home(settings.home)
        instance = DagsterInstance.get()
        store = ArtifactStore(home=str(settings.home))
        print(f"memkfac main job: config {settings.config_path}, data in {settings.home}, Dagster in {home}")
        start = time.perf_counter()
        failed = run_pipeline(build_definitions(config, settings), instance, store)
    except MemkfacError as e:
        print(f"memkfac main job: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        where = e.step if isinstance(e, PipelineInterrupted) and e.step else "between steps"
        print(
            f"\nInterrupted ({where}); nothing after it was started. Finished steps are kept: "
            "rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    minutes = (time.perf_counter() - start) / 60
    if failed:
        print(
            f"\nFAILED after {minutes:.1f} min: {'; '.join(failed)}. Open the Dagster UI for logs; "
            "rerunning the same command retries these and completes the rest.",
            file=sys.stderr,
        )
    else:
        print(f"\nDone in {minutes:.1f} min.")
    print(
        "\nWhere to look:\n"
        f"  Dagster UI:  DAGSTER_HOME={home} dagster dev -w workspace.yaml   (then http://127.0.0.1:3000)\n"
        f"  MLflow UI:   mlflow ui --backend-store-uri {settings.mlflow_uri(config)}\n"
        f"  Reports:     {store.duckdb_path} (schema main_reports)\n\n"
        f"{report_table(store)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
