"""The main job: materialize the whole graph of the pipeline config, in process, and say where to look.

    python -m jobs.main                     # the embedded default (configs/default.yaml)
    MEMKFAC_CONFIG=configs/tiny.yaml python -m jobs.main

It does what the sensors do, to a fixed point: each round reports the input files as observations,
evaluates every automation condition and executes what they request, in dependency order (one run
per level and partition). When they request nothing more, it requests what is still missing or whose
last execution failed, once its inputs exist, so a rerun completes what an interrupted or failed
invocation left. A step is skipped when every partition it reads of one input failed: what reads a
failed variant is skipped, a report over all variants runs on those that exist. Exit status 0 when
the whole graph is materialized, 1 naming the failed steps, 2 on a config error, 130 on Ctrl-C or
SIGTERM. Rerunning resumes, also after kill -9 (the runs it left unfinished are marked failed and
their pool slots freed). Runs land in the instance at ``$DAGSTER_HOME`` (default
``$MEMKFAC_HOME/dagster``), where ``dagster dev`` shows them. Public Dagster API only, except what
jobs/dagster_adapter.py isolates.
"""

from __future__ import annotations

import argparse
import graphlib
import os
import shutil
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import dagster as dg

from jobs import dagster_adapter as adapter

MAX_ROUNDS = 20  # the graph is 11 levels deep; each round settles at least one level
CURSOR_FILE = "memkfac_automation_cursor.json"  # in the instance directory: what automation handled
PID_TAG = "memkfac/main_job_process"  # on every run the main job executes: "host:pid" of the process
AC = dg.AutomationCondition
# What an earlier invocation left undone: eager conditions count a requested partition as handled
# even if its run never finished, so they never request it again.
INCOMPLETE = ((AC.missing() | AC.execution_failed()) & ~AC.any_deps_missing() & ~AC.in_progress()).with_label(
    "missing_or_failed"
)


class Step(NamedTuple):
    """One asset partition (``partition`` None: an unpartitioned asset), printed ``asset[partition]``."""

    key: dg.AssetKey
    partition: str | None = None

    def __str__(self) -> str:
        name = self.key.to_user_string()
        return f"{name}[{self.partition}]" if self.partition else name


class PipelineInterrupted(KeyboardInterrupt):
    """Ctrl-C, or a run that ended interrupted; ``step`` names what was running (None: between runs)."""

    def __init__(self, step: str | None):
        super().__init__(step)
        self.step = step


class Graph:
    """The asset graph as the main job walks it. It builds what automation owns: every asset with an
    automation condition (the observable sources are observed, not built)."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance):
        self.defs, self.instance = defs, instance
        self.specs = {s.key: s for s in defs.resolve_all_asset_specs()}
        sorter = graphlib.TopologicalSorter({k: {d.asset_key for d in s.deps} for k, s in self.specs.items()})
        sorter.prepare()
        self.levels = []
        while sorter.is_active():
            self.levels.append(sorted(sorter.get_ready(), key=str))
            sorter.done(*self.levels[-1])
        self.built = [k for level in self.levels for k in level if self.specs[k].automation_condition]

    def requested(self, condition: dg.AutomationCondition | None = None, cursor=None):
        """What the automation conditions request (``condition``: what it requests on every built
        asset instead); returns ``(steps, cursor)``."""
        defs = self.defs
        if condition is not None:

            def replace(spec: dg.AssetSpec) -> dg.AssetSpec:
                return (
                    spec.replace_attributes(automation_condition=condition)
                    if spec.automation_condition
                    else spec
                )

            assets = [
                dg.map_asset_specs(replace, [a])[0] if isinstance(a, dg.AssetsDefinition) else a
                for a in defs.assets
            ]
            defs = dg.Definitions(assets=assets, asset_checks=defs.asset_checks, resources=defs.resources)
        result = dg.evaluate_automation_conditions(defs=defs, instance=self.instance, cursor=cursor)
        return {Step(k, p) for k in self.built for p in result.get_requested_partitions(k)}, result.cursor

    def schedule(self, steps: set[Step], unusable: set[Step], log=None) -> Iterator[list[Step]]:
        """``steps`` level by level, less those for which, for some input, every partition they read
        is in ``unusable`` (failed, left out, or no partitions yet); those join ``unusable``. The caller
        adds a level's failures to ``unusable`` before asking for the next level."""
        for level in self.levels:
            runnable = []
            for step in sorted((s for s in steps if s.key in level), key=str):
                read = adapter.inputs(self.defs, self.instance, step.key, step.partition)
                if any({Step(k, p) for p in ps} <= unusable for k, ps in read.items()):
                    unusable.add(step)
                    if log:
                        log(f"  {step}: skipped, an input failed")
                else:
                    runnable.append(step)
            yield runnable


def dagster_home(memkfac_home: Path) -> Path:
    """``$DAGSTER_HOME`` (default ``$MEMKFAC_HOME/dagster``), with dagster.yaml.example's settings
    (one slot per pool: dbt stays the only DuckDB writer) unless a dagster.yaml is already there."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(memkfac_home / "dagster"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(
            Path(__file__).resolve().parent.parent / "dagster.yaml.example", home / "dagster.yaml"
        )
    return home


def observe_inputs(defs: dg.Definitions, instance, store, cursor: str | None) -> str:
    """One tick of the input-files sensor, applied (observations reported, probe sets registered);
    returns the sensor's new cursor."""
    from jobs.sensors import SENSOR_NAME

    sensor = next(s for s in defs.sensors if s.name == SENSOR_NAME)
    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources={"store": store}))
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result.cursor


def fail_abandoned_runs(instance: dg.DagsterInstance, log=print) -> None:
    """Mark as failed the runs a killed main job left unfinished, and free their pool slots: else they
    look in progress for ever (no condition requests a partition in progress) and a step of the same
    pool waits for ever. A run is abandoned when the process named by its PID_TAG ran on this host
    and is gone."""
    unfinished = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
    for run in (r.dagster_run for r in instance.get_run_records(filters=unfinished)):
        host, _, pid = run.tags.get(PID_TAG, "").rpartition(":")
        if host == socket.gethostname() and not _process_alive(int(pid)):
            assets = ", ".join(sorted(k.to_user_string() for k in run.asset_selection or ()))
            log(f"  run {run.run_id[:8]} ({assets}) was left unfinished by a killed main job: marked failed")
            adapter.fail_run(instance, run, "the main job that ran it was killed")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def execute_requested(graph: Graph, requested: set[Step], failed: set[Step], log=print) -> dict[Step, bool]:
    """Execute ``requested`` in dependency order, one run per level and partition (a run's assets share
    their partitioning), skipping what ``Graph.schedule`` leaves out; returns ``{step: success}`` of
    those that ran (success: materialized, no blocking check failed). Raises PipelineInterrupted as
    soon as a run ends interrupted: nothing after it starts."""
    job = adapter.asset_job(graph.defs)
    outcomes, unusable = {}, set(failed)
    for runnable in graph.schedule(requested, unusable, log):
        runs = defaultdict(list)
        for step in runnable:
            runs[(id(graph.specs[step.key].partitions_def), step.partition)].append(step.key)
        for (_, partition), keys in sorted(runs.items(), key=lambda kv: str(kv[0][1])):
            names = ", ".join(k.to_user_string() for k in keys)
            label, start = f"{names}[{partition}]" if partition else names, time.perf_counter()
            try:
                result = job.execute_in_process(
                    instance=graph.instance,
                    asset_selection=keys,
                    partition_key=partition,
                    raise_on_error=False,
                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
                    tags={PID_TAG: f"{socket.gethostname()}:{os.getpid()}"},
                )
            except KeyboardInterrupt:  # before Dagster captured the signal: no run to inspect
                raise PipelineInterrupted(label) from None
            seconds = time.perf_counter() - start
            if adapter.ended_by_interrupt(graph.instance.get_run_by_id(result.run_id)):
                log(f"  {label}: INTERRUPTED after {seconds:.1f}s")
                raise PipelineInterrupted(label)
            succeeded = {e.asset_key for e in result.get_asset_materialization_events()} - {
                c.asset_key
                for c in result.get_asset_check_evaluations()
                if c.blocking and not c.passed and c.severity == dg.AssetCheckSeverity.ERROR
            }
            bad = [k.to_user_string() for k in keys if k not in succeeded]
            log(f"  {label}: {'FAILED ' + ', '.join(bad) if bad else 'ok'} in {seconds:.1f}s")
            for step in (Step(k, partition) for k in keys):
                outcomes[step] = step.key in succeeded
                if outcomes[step]:
                    unusable.discard(step)  # a retry of an earlier failure
                else:
                    unusable.add(step)
    return outcomes


def run_pipeline(defs: dg.Definitions, instance: dg.DagsterInstance, store, log=print) -> list[str]:
    """Run rounds until nothing more is requested; return the failed steps (empty on success).

    A round executes what the automation conditions request; when they request nothing, what
    ``INCOMPLETE`` requests, less what this invocation already ran (a failure is tried once per
    invocation unless automation requests it again) and what reads only failed steps. The automation
    cursor is kept in the instance directory between invocations, as the daemon keeps its own, so "an
    upstream's data version changed since last handled" carries over; it is saved once a round has
    run, so the next invocation requests an interrupted round again. Raises PipelineInterrupted.
    """
    from memkfac.paths import atomic_file

    cursor_file = adapter.instance_dir(instance) / CURSOR_FILE
    cursor = dg.deserialize_value(cursor_file.read_text()) if cursor_file.is_file() else None
    graph = Graph(defs, instance)
    fail_abandoned_runs(instance, log)
    sensor_cursor, attempted, failed = None, set(), set()
    try:
        for round_no in range(1, MAX_ROUNDS + 1):
            sensor_cursor = observe_inputs(defs, instance, store, sensor_cursor)
            (requested, new_cursor), why = graph.requested(cursor=cursor), "requested"
            if not requested:
                candidates, why = graph.requested(INCOMPLETE)[0], "still missing or failed"
                left_out = failed | (candidates & attempted)
                requested = {s for level in graph.schedule(candidates - attempted, left_out) for s in level}
            if requested:
                log(f"round {round_no}: {len(requested)} asset partitions {why}")
                outcomes = execute_requested(graph, requested, failed, log)
                attempted |= outcomes.keys()
                failed = (failed - outcomes.keys()) | {s for s, ok in outcomes.items() if not ok}
            cursor = new_cursor
            with atomic_file(cursor_file) as tmp:
                tmp.write_text(dg.serialize_value(cursor))
            if not requested:
                if failed:
                    return sorted(map(str, failed))
                missing = sorted(map(str, graph.requested(AC.missing())[0]))
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                return (
                    [f"never materialized, an input is missing: {', '.join(missing[:5])}{more}"]
                    if missing
                    else []
                )
    except PipelineInterrupted:
        raise
    except KeyboardInterrupt:  # between runs (observing inputs, evaluating conditions)
        raise PipelineInterrupted(None) from None
    return sorted(map(str, failed)) + [f"still requesting after {MAX_ROUNDS} rounds"]


def report_table(store) -> str:
    """The recall-vs-perplexity report, read from the DuckDB file dbt wrote (read-only)."""
    import duckdb

    if not store.duckdb_path.is_file():
        return "(no report database yet)"
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        rows = con.execute(
            "select variant, probe_set, round(strict_pct, 1), round(loose_pct, 1), "
            "round(base_strict_pct, 1), round(perplexity, 2), round(100 * perplexity_increase, 1), "
            "round(ndcg, 3) from main_reports.recall_vs_perplexity order by probe_set, variant"
        ).fetchall()
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
    argparse.ArgumentParser(
        prog="python -m jobs.main",
        description="Materialize the whole memkfac pipeline (MEMKFAC_CONFIG, default configs/default.yaml) "
        "offline on this machine, then print where to look at the results.",
    ).parse_args(argv)
    import warnings

    from memkfac.errors import MemkfacError

    # The pinned Dagster marks APIs this project relies on as beta/preview; say so once, not per tick.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill, a CI timeout: like Ctrl-C
    try:
        from definitions import build_definitions
        from jobs.ui import make_command
        from resources.config import load_config
        from resources.settings import Settings
        from resources.store import ArtifactStore

        settings = Settings.from_env()
        config = load_config(settings.config_path)
        home = dagster_home(settings.home)
        store = ArtifactStore(home=str(settings.home))
        print(f"memkfac main job: config {settings.config_path}, data in {settings.home}, Dagster in {home}")
        start = time.perf_counter()
        failed = run_pipeline(build_definitions(config, settings), dg.DagsterInstance.get(), store)
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
            f"\nFAILED after {minutes:.1f} min: {'; '.join(failed)}. What does not need them was built and "
            "is reported below. Open the Dagster UI for logs; rerunning the same command retries them "
            "and completes the rest.",
            file=sys.stderr,
        )
    else:
        print(f"\nDone in {minutes:.1f} min.")
    print(
        "\nWhere to look (from the project directory):\n"
        f"  Dagster UI:  {make_command('ui', settings, home)}   (http://127.0.0.1:3000; runs in {home})\n"
        f"  MLflow UI:   {make_command('mlflow-ui', settings, home)}   "
        f"(http://127.0.0.1:5000; store {settings.mlflow_uri(config)})\n"
        f"  Reports:     {store.duckdb_path} (schema main_reports)\n\n"
        f"{report_table(store)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
