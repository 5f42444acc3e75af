"""The code location loads; its graph, sensors and schedules are what users rely on."""

from __future__ import annotations

import dagster as dg

# blocking checks of every config (positional_stress_table_valid too when evaluation.stress is on)
BLOCKING_CHECKS = {
    "factors_healthy",
    "edited_model_valid",
    "memorization_table_valid",
    "mia_table_valid",
    "perplexity_table_valid",
}
# dbt tests of the MIA report, as Dagster names them
MIA_REPORT_CHECKS = {
    "not_null_mia_auc_by_variant_auc",
    "in_range_mia_auc_by_variant_auc__1__0",
    "in_range_mia_auc_by_variant_base_auc__1__0",
    "in_range_mia_auc_by_variant_auc_drop__1___1",
    "not_null_mia_auc_by_variant_tpr_at_1pct_fpr",
    "in_range_mia_auc_by_variant_tpr_at_1pct_fpr__1__0",
    "accepted_values_mia_auc_by_variant_score__loss__zlib_ratio__min_k__min_k_pp",
}


def test_default_definitions_load():
    from definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {
        "model_files",
        "corpus_files",
        "probe_set_files",
        "base_model",
        "corpus",
        "canaries",
        "subject_model",
        "probe_sets",
        "kfac_factors",
        "kfac_eigenbasis",
        "edited_model",
        "registered_model",
        "memorization_eval",
        "utility_eval",
        "resurgence",
        "downstream_base",
        "downstream_eval",
        "band_analysis",
        "champions",
        "watch_history",
        "reports/recall_over_time",
        "reports/downstream_retention",
        "reports/forgetting_by_variant",
        "reports/utility_retention",
        "reports/recall_vs_perplexity",
        "reports/resurgence_curves",
        "reports/resurgence_spread",
        "reports/mia_auc_by_variant",
    } <= keys
    checks = {c.name for c in graph.asset_check_keys}
    assert checks >= BLOCKING_CHECKS | MIA_REPORT_CHECKS  # dbt tests as checks
    assert set(defs.resources) >= {"store", "factor_runner", "mlflow", "dbt"}


def test_every_asset_has_group_code_version_description_and_automation():
    from definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert node.group_name and node.group_name != "default", key
        assert node.automation_condition is not None, key
        if key.path[0] != "reports":  # dbt code versions come from the SQL
            assert node.code_version, key
            assert node.description, key


def test_sensors_and_schedules_run_on_a_fresh_instance():
    from definitions import defs

    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {
        "memkfac_automation",
        "input_files_sensor",
        "registry_watch",
        "comparison_reports",
    }
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    # the automation sensor covers the observable sources too, so Dagster adds no stopped default sensor
    repo = defs.get_repository_def()
    assert "default_automation_condition_sensor" not in {s.name for s in repo.sensor_defs}
    (schedule,) = defs.schedules
    assert schedule.name == "weekly_resurgence"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_weekly_schedule_requests_each_tested_variant(tiny_defs):
    import datetime as dt

    from assets.resurgence import SEED_TAG

    defs, config, _ = tiny_defs
    schedule = defs.resolve_schedule_def("weekly_resurgence")
    context = dg.build_schedule_context(
        repository_def=defs.get_repository_def(),
        scheduled_execution_time=dt.datetime(2026, 11, 29, 3, tzinfo=dt.UTC),
    )
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [r.partition_key for r in requests] == config.resurgence_variants
    assert len({r.run_key for r in requests}) == len(requests)
    # every run of a tick carries the tick's seed (its Unix time): a new one each week
    assert {r.tags[SEED_TAG] for r in requests} == {str(int(context.scheduled_execution_time.timestamp()))}


def test_partitions_follow_the_config(tiny_defs):
    defs, config, _ = tiny_defs
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("kfac_factors")).partitions_def.get_partition_keys() == ["tiny-llama"]
    assert graph.get(dg.AssetKey("edited_model")).partitions_def.get_partition_keys() == config.variants
    assert (
        "tiny-llama__base"
        not in graph.get(dg.AssetKey("registered_model")).partitions_def.get_partition_keys()
    )
    dims = graph.get(dg.AssetKey("memorization_eval")).partitions_def.partition_dimension_names
    assert sorted(dims) == ["probe_set", "variant"]
    checks = {c.name for c in graph.asset_check_keys}
    assert checks >= BLOCKING_CHECKS | {"positional_stress_table_valid"}  # tiny.yaml: stress on
