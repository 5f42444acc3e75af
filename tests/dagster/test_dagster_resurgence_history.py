"""The attack suite's history: scheduled ticks append runs with their own seeds, dbt reports the spread."""

from __future__ import annotations

import datetime as dt
import os

import dagster as dg
import pytest

from tests.dagster.test_dagster_assets_extra import BASE, _base_only, _config, _definitions, _execute

pytestmark = pytest.mark.slow

TICKS = (dt.datetime(2026, 11, 29, 3, tzinfo=dt.UTC), dt.datetime(2026, 12, 6, 3, tzinfo=dt.UTC))


def test_two_scheduled_ticks_append_two_evaluations_with_different_seeds(tiny_home, tmp_path, monkeypatch):
    """A run without the schedule's tag (as automation or the main job starts it) uses the configured
    seed; each of two ticks appends a run with its own. The unedited variant alone (no edits, no
    factors): the least the resurgence asset reads."""
    from assets.resurgence import SEED_TAG
    from jobs.schedules import RESURGENCE_JOB
    from memkfac.resurgence import ARMS
    from memkfac.tables import read_table
    from resources.config import load_config

    _config(tmp_path, monkeypatch, _base_only)
    defs, instance = _definitions(), dg.DagsterInstance.ephemeral()
    assert _execute(defs, instance, ["canaries"]).success
    instance.add_dynamic_partitions("probe_set", ["canaries"])
    assert _execute(defs, instance, ["probe_sets"], "canaries").success
    assert _execute(defs, instance, ["base_model", "corpus", "subject_model"], "tiny-llama").success
    assert _execute(defs, instance, ["edited_model"], BASE).success
    config = load_config(os.environ["MEMKFAC_CONFIG"])
    assert _execute(defs, instance, ["resurgence"], BASE).success
    assert set(read_table("resurgence", tiny_home).column("seed").to_pylist()) == {
        config.resurgence.arguments.seed
    }

    schedule = defs.resolve_schedule_def("weekly_resurgence")
    job = defs.resolve_job_def(RESURGENCE_JOB)
    for tick in TICKS:
        context = dg.build_schedule_context(
            instance=instance, repository_def=defs.get_repository_def(), scheduled_execution_time=tick
        )
        (request,) = schedule.evaluate_tick(context).run_requests
        result = job.execute_in_process(
            instance=instance, partition_key=request.partition_key, tags=request.tags
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("resurgence")
        assert materialization.metadata["seed"].value == int(request.tags[SEED_TAG])

    rows = read_table("resurgence", tiny_home).to_pylist()  # the history: nothing overwritten
    runs = {(r["run_id"], r["seed"]) for r in rows}
    assert sorted(seed for _, seed in runs) == [
        config.resurgence.arguments.seed,
        *(int(t.timestamp()) for t in TICKS),
    ]
    assert len({run_id for run_id, _ in runs}) == 3
    steps = (0, *config.resurgence.arguments.steps)
    per_run = {(a, n, k) for a in ARMS for n in steps for k in ("memorized", "control")}
    for run_id, _ in runs:
        assert {(r["arm"], r["steps"], r["kind"]) for r in rows if r["run_id"] == run_id} == per_run
    for r in rows:
        expected = r["strict_pct"] / r["strict_pct_before_edit"] if r["strict_pct_before_edit"] else None
        assert r["recovered"] == pytest.approx(expected)


def test_reports_give_each_run_and_the_mean_and_spread_over_runs(tmp_path, monkeypatch):
    """resurgence_curves keeps every run (its ratios computed within the run); resurgence_spread
    aggregates recovered per (model, edit, arm, kind, step) over the runs."""
    import duckdb
    from dagster_dbt import DbtCliResource

    from memkfac.tables import make_table, write_table
    from resources.dbt_project import dbt_project
    from resources.settings import DBT_EXECUTABLE

    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    edited = "tiny-llama__kfac-r0.9"

    def row(arm: str, steps: int, strict: float, seed: int) -> dict:
        return dict(
            arm=arm,
            seed=seed,
            steps=steps,
            kind="memorized",
            n_probes=4,
            strict_pct=strict,
            loose_pct=strict,
            avg_lev=0.5,
            strict_pct_before_edit=100.0,
            recovered=strict / 100,
        )

    # two runs of the edit: relearn recovers 25 then 75 points after 10 steps, from 0 at step 0
    for run_id, seed, strict in (("r1", 11, 25.0), ("r2", 22, 75.0)):
        rows = [row("relearn", 0, 0.0, seed), row("relearn", 10, strict, seed)]
        write_table(
            "resurgence", make_table("resurgence", rows, variant=edited, probe_set="canaries", run_id=run_id)
        )
    dbt = DbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE)
    dbt.cli(["build", "--select", "resurgence_curves+"], target_path=tmp_path / "target").wait()
    with duckdb.connect(str(tmp_path / "reports.duckdb"), read_only=True) as con:
        curves = con.execute(
            "select run_id, seed, steps, recovered, removed_fraction_back "
            "from main_reports.resurgence_curves order by all"
        ).fetchall()
        spread = con.execute(
            "select model, edit, arm, kind, steps, n_runs, recovered_mean, recovered_stddev, recovered_min, "
            "recovered_max from main_reports.resurgence_spread order by steps"
        ).fetchall()
    assert curves == [
        ("r1", 11, 0, 0.0, 0.0),
        ("r1", 11, 10, 0.25, 0.25),
        ("r2", 22, 0, 0.0, 0.0),
        ("r2", 22, 10, 0.75, 0.75),
    ]
    std = pytest.approx(((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) ** 0.5)  # sample stddev of two runs
    assert spread == [
        ("tiny-llama", "kfac-r0.9", "relearn", "memorized", 0, 2, 0.0, 0.0, 0.0, 0.0),
        ("tiny-llama", "kfac-r0.9", "relearn", "memorized", 10, 2, 0.5, std, 0.25, 0.75),
    ]
