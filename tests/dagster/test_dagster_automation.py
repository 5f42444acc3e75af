"""Declarative automation on the real graph, driven by evaluate_automation_conditions.

The asset state is set up with runless events (no computation): what is tested is which asset
partitions the conditions request when inputs change.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest
import yaml

from resources.config import parse_config
from tests.dagster.conftest import TINY_CONFIG

T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
MODELS = ("tiny-a", "tiny-b")


@pytest.fixture
def two_model_defs(tiny_home):
    """The tiny pipeline with two base models, and an instance with both probe sets registered."""
    from definitions import build_definitions
    from resources.settings import Settings

    raw = yaml.safe_load(TINY_CONFIG.read_text().replace("${MEMKFAC_HOME}", str(tiny_home)))
    source = raw["models"].pop("tiny-llama")
    raw["models"] = {m: source for m in MODELS}
    config = parse_config(raw)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("probe_set", ["canaries"])
    return build_definitions(config, Settings.from_env()), config, instance


def _observe(instance, key: str, partition: str | None, version: str) -> None:
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=key, partition=partition, tags={"dagster/data_version": version})
    )


def _materialize_everything(defs, instance) -> None:
    """Record every asset partition as materialized, in dependency order, with its code version."""
    graph = defs.resolve_asset_graph()
    for level in graph.toposorted_asset_keys_by_level:
        for key in level:
            node = graph.get(key)
            if not node.is_materializable:
                continue
            partitions = (
                node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
                if (node.partitions_def)
                else [None]
            )
            for p in partitions:
                tags = {"dagster/data_version": f"{key.to_user_string()}-{p}-v1"}
                if node.code_version:
                    tags["dagster/code_version"] = node.code_version
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=key, partition=p, tags=tags)
                )


def _requested(result, defs) -> dict[str, set[str]]:
    keys = defs.resolve_asset_graph().materializable_asset_keys
    return {
        k.to_user_string(): {str(p) for p in result.get_requested_partitions(k)}
        for k in keys
        if result.get_num_requested(k)
    }


def _cascade(defs, instance, cursor, start: dt.datetime, version: str = "v2") -> dict[str, set[str]]:
    """Tick, record what was requested as materialized with a new data version, repeat until quiet.

    Returns everything requested over all ticks: what one input change rebuilds downstream.
    """
    graph = defs.resolve_asset_graph()
    total: dict[str, set[str]] = {}
    for minute in range(12):
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=cursor, evaluation_time=start + dt.timedelta(minutes=minute)
        )
        cursor = result.cursor
        requested = _requested(result, defs)
        if not requested:
            return total
        for name, partitions in requested.items():
            total.setdefault(name, set()).update(partitions)
            key = dg.AssetKey.from_user_string(name)
            node = graph.get(key)
            for p in result.get_requested_partitions(key):
                tags = {"dagster/data_version": f"{name}-{p}-{version}-{minute}"}
                if node.code_version:
                    tags["dagster/code_version"] = node.code_version
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=key, partition=p, tags=tags)
                )
    raise AssertionError("automation did not settle")


def _settled(defs, instance):
    """Observe the inputs, record everything materialized, and tick until nothing is requested."""
    for m in MODELS:
        _observe(instance, "model_files", m, "weights-v1")
    _observe(instance, "corpus_files", None, "corpus-v1")
    _observe(instance, "probe_set_files", "canaries", "probes-v1")
    cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=T0).cursor
    _materialize_everything(defs, instance)
    for minute in range(1, 4):
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=cursor, evaluation_time=T0 + dt.timedelta(minutes=minute)
        )
        cursor = result.cursor
    assert result.total_requested == 0
    return cursor


def test_cold_start_requests_the_roots_once(two_model_defs):
    defs, _, instance = two_model_defs
    for m in MODELS:
        _observe(instance, "model_files", m, "weights-v1")
    _observe(instance, "corpus_files", None, "corpus-v1")
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=T0)
    requested = _requested(first, defs)
    assert requested["base_model"] == set(MODELS)
    assert requested["canaries"] == {"None"}
    assert "kfac_factors" not in requested  # its inputs do not exist yet
    second = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=first.cursor, evaluation_time=T0 + dt.timedelta(minutes=1)
    )
    assert second.total_requested == 0


def test_model_file_change_rebuilds_that_model_only(two_model_defs):
    defs, config, instance = two_model_defs
    cursor = _settled(defs, instance)
    _observe(instance, "model_files", "tiny-a", "weights-v2")
    requested = _cascade(defs, instance, cursor, T0 + dt.timedelta(minutes=10))
    assert requested["base_model"] == {"tiny-a"}
    for key, partitions in requested.items():
        assert not any("tiny-b" in p for p in partitions), (key, partitions)
    a_variants = set(config.variants_of("tiny-a"))
    assert requested["kfac_factors"] == {"tiny-a"}
    assert requested["edited_model"] == a_variants
    assert requested["memorization_eval"] == {f"canaries|{v}" for v in a_variants}
    assert {"reports/forgetting_by_variant", "reports/recall_vs_perplexity"} <= set(requested)


def test_unchanged_observation_requests_nothing(two_model_defs):
    defs, _, instance = two_model_defs
    cursor = _settled(defs, instance)
    _observe(instance, "model_files", "tiny-a", "weights-v1")
    result = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=cursor, evaluation_time=T0 + dt.timedelta(minutes=10)
    )
    assert result.total_requested == 0


def test_probe_file_change_evaluates_every_variant_on_it(two_model_defs):
    defs, config, instance = two_model_defs
    instance.add_dynamic_partitions("probe_set", ["pii"])
    _observe(instance, "probe_set_files", "pii", "pii-v1")
    cursor = _settled(defs, instance)
    _observe(instance, "probe_set_files", "pii", "pii-v2")
    requested = _cascade(defs, instance, cursor, T0 + dt.timedelta(minutes=10))
    assert requested["probe_sets"] == {"pii"}
    cells = requested["memorization_eval"]
    assert cells == {f"pii|{v}" for v in config.variants}
    assert "edited_model" not in requested and "kfac_factors" not in requested


def test_canary_probe_set_change_reinjects_what_reads_the_validated_copy(two_model_defs):
    """Injection, edits (forget sets), band analysis and resurgence read the validated canaries."""
    defs, config, instance = two_model_defs
    cursor = _settled(defs, instance)
    _observe(instance, "probe_set_files", "canaries", "probes-v2")
    requested = _cascade(defs, instance, cursor, T0 + dt.timedelta(minutes=10))
    assert requested["probe_sets"] == {"canaries"}
    assert requested["subject_model"] == set(MODELS) and requested["band_analysis"] == set(MODELS)
    assert requested["edited_model"] == set(config.variants)
    assert requested["resurgence"] == set(config.resurgence_variants)
    assert "base_model" not in requested and "corpus" not in requested


def test_new_probe_set_file_evaluates_every_variant(two_model_defs):
    defs, config, instance = two_model_defs
    cursor = _settled(defs, instance)
    instance.add_dynamic_partitions("probe_set", ["pii"])
    _observe(instance, "probe_set_files", "pii", "pii-v1")
    requested = _cascade(defs, instance, cursor, T0 + dt.timedelta(minutes=10))
    assert requested["probe_sets"] == {"pii"}
    assert requested["memorization_eval"] == {f"pii|{v}" for v in config.variants}


def test_code_version_bump_rebuilds_the_asset_and_what_follows(two_model_defs):
    defs, config, instance = two_model_defs
    cursor = _settled(defs, instance)

    def bump(spec):
        return spec.replace_attributes(code_version="edit-v2") if spec.key.path == ["edited_model"] else spec

    bumped = dg.Definitions(
        assets=[a.map_asset_specs(bump) if isinstance(a, dg.AssetsDefinition) else a for a in defs.assets],
        sensors=defs.sensors,
        resources=defs.resources,
    )
    requested = _cascade(bumped, instance, cursor, T0 + dt.timedelta(minutes=10))
    assert requested["edited_model"] == set(config.variants)
    assert "memorization_eval" in requested and "utility_eval" in requested
    assert "kfac_factors" not in requested and "base_model" not in requested


def test_the_weekly_tick_is_the_schedules_alone(two_model_defs):
    """The schedule is the attack suite's one clock: its automation condition has no cron clause, so
    at the tick automation requests nothing (it would start a second run beside the schedule's)."""
    defs, config, instance = two_model_defs
    assert config.resurgence.cron == "0 3 * * 0"
    condition = defs.resolve_asset_graph().get(dg.AssetKey("resurgence")).automation_condition

    def nodes(c):
        return [c, *(n for child in c.children for n in nodes(child))]

    assert not [n for n in nodes(condition) if "cron" in type(n).__name__.lower()]
    cursor = _settled(defs, instance)
    sunday_after_3 = dt.datetime(2026, 11, 29, 3, 5, tzinfo=dt.UTC)
    result = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=cursor, evaluation_time=sunday_after_3
    )
    assert _requested(result, defs) == {}
