"""The main job: materialize the whole graph of the pipeline config, in process, and say where to look.

    python -m jobs.main                     # the embedded default (configs/default.yaml)
    MEMKFAC_CONFIG=configs/tiny.yaml python -m jobs.main

It runs exactly what the automation sensor would run: each round reports the input files as
observations, evaluates every automation condition once and executes what they request, in
dependency order, one run per asset group and partition; it stops when nothing more is requested.
So a second run after a change recomputes only what the change touched (the canary injection stays
cached). Runs land in the Dagster instance at ``$DAGSTER_HOME`` (default ``$MEMKFAC_HOME/dagster``),
so ``dagster dev`` shows them afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

MAX_ROUNDS = 20  # the graph is 11 levels deep; each round settles at least one level
CURSOR_FILE = "memkfac_automation_cursor.json"  # under DAGSTER_HOME: what automation already handled


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


def execute_requested(defs, instance, requested: dict, log=print) -> dict[str, bool]:
    """Execute ``{asset_key: partition keys}`` in dependency order; return ``{step name: success}``."""
    graph = defs.resolve_asset_graph()
    job = defs.resolve_implicit_global_asset_job_def()
    outcomes = {}
    for level in graph.toposorted_asset_keys_by_level:
        # one run per (partitions definition, key): a run's assets must share their partitioning
        by_partition = defaultdict(list)
        for key in level:
            for partition in requested.get(key, ()):
                by_partition[(id(graph.get(key).partitions_def), partition)].append(key)
        for (_, partition), keys in sorted(by_partition.items(), key=lambda kv: str(kv[0][1])):
            names = ", ".join(k.to_user_string() for k in keys)
            where = f"[{partition}]" if partition else ""
            start = time.perf_counter()
            result = job.execute_in_process(
                instance=instance,
                asset_selection=keys,
                partition_key=partition,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            )
            status = "ok" if result.success else "FAILED"
            log(f"  {names}{where}: {status} in {time.perf_counter() - start:.1f}s")
            for key in keys:
                outcomes[f"{key.to_user_string()}{where}"] = result.success
    return outcomes


def run_pipeline(defs, instance, store, log=print) -> list[str]:
    """Drive declarative automation to a fixed point; return failed steps (empty on success).

    A failed step does not stop the rounds: a later round may request it again once more of its
    inputs exist (a dbt report whose sibling report was still missing). The automation cursor is
    kept in the Dagster home between invocations, like the daemon keeps its own, so conditions such
    as "an upstream's data version changed since last handled" carry over.
    """
    from dagster import evaluate_automation_conditions
    from dagster_shared.serdes import deserialize_value, serialize_value

    from memkfac.paths import atomic_file

    cursor_file = Path(instance.root_directory) / CURSOR_FILE
    cursor = deserialize_value(cursor_file.read_text()) if cursor_file.is_file() else None
    sensor_cursor, outcomes = None, {}
    for round_no in range(1, MAX_ROUNDS + 1):
        sensor_cursor = observe_inputs(defs, instance, store, sensor_cursor)
        result = evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=cursor, evaluation_time=dt.datetime.now(dt.UTC)
        )
        cursor = result.cursor
        with atomic_file(cursor_file) as tmp:
            tmp.write_text(serialize_value(cursor))
        keys = defs.resolve_asset_graph().materializable_asset_keys
        requested = {
            k: sorted(result.get_requested_partitions(k), key=str)
            for k in keys
            if result.get_num_requested(k)
        }
        if not requested:
            return [step for step, ok in outcomes.items() if not ok]
        log(f"round {round_no}: {result.total_requested} asset partitions requested")
        outcomes |= execute_requested(
            defs, instance, {k: [p or None for p in v] for k, v in requested.items()}, log
        )
    return [step for step, ok in outcomes.items() if not ok] + [f"still requesting after {MAX_ROUNDS} rounds"]


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

    try:
        from dagster import DagsterInstance

        import definitions
        from resources.store import ArtifactStore

        settings = definitions.SETTINGS
        home = dagster_home(settings.home)
        instance = DagsterInstance.get()
        store = ArtifactStore(home=str(settings.home))
        print(f"memkfac main job: config {settings.config_path}, data in {settings.home}, Dagster in {home}")
        start = time.perf_counter()
        failed = run_pipeline(definitions.defs, instance, store)
    except MemkfacError as e:
        print(f"memkfac main job: error: {e}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - start) / 60
    if failed:
        print(
            f"\nFAILED after {minutes:.1f} min: {'; '.join(failed)}. Open the Dagster UI for logs.",
            file=sys.stderr,
        )
    else:
        print(f"\nDone in {minutes:.1f} min.")
    print(
        "\nWhere to look:\n"
        f"  Dagster UI:  DAGSTER_HOME={home} dagster dev -w workspace.yaml   (then http://127.0.0.1:3000)\n"
        f"  MLflow UI:   mlflow ui --backend-store-uri {settings.mlflow_uri(definitions.CONFIG)}\n"
        f"  Reports:     {store.duckdb_path} (schema main_reports)\n\n"
        f"{report_table(store)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
