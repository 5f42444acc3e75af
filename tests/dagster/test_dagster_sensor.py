"""The input-files sensor: runless observations of changed inputs, new probe sets as partitions."""

from __future__ import annotations

import datetime as dt
import json
import os

import dagster as dg

from resources.store import ArtifactStore

PROBE = {
    "id": "p1",
    "prefix": "Customer record for Ann Lee:",
    "suffix": " email ann@example.org",
    "kind": "memorized",
}


def _tick(defs, instance, store, cursor):
    sensor = defs.resolve_sensor_def("input_files_sensor")
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"store": store}, definitions=defs
    )
    result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _events(result) -> dict:
    return {
        (e.asset_key.to_user_string(), e.partition): e.tags["dagster/data_version"]
        for e in result.asset_events
    }


def test_sensor_observes_changes_and_registers_probe_sets(tiny_defs, tiny_home):
    defs, _, _ = tiny_defs
    instance = dg.DagsterInstance.ephemeral()
    store = ArtifactStore(home=str(tiny_home))

    first = _tick(defs, instance, store, None)
    assert set(_events(first)) == {("model_files", "tiny-llama"), ("corpus_files", None)}
    assert first.dynamic_partitions_requests == []

    store.probes_dir.mkdir(parents=True)
    (store.probes_dir / "pii.jsonl").write_text(json.dumps(PROBE) + "\n")
    (store.probes_dir / "bad name.jsonl").write_text(json.dumps(PROBE) + "\n")  # not a valid partition key
    second = _tick(defs, instance, store, first.cursor)
    assert set(_events(second)) == {("probe_set_files", "pii")}
    assert [list(r.partition_keys) for r in second.dynamic_partitions_requests] == [["pii"]]
    assert instance.get_dynamic_partitions("probe_set") == ["pii"]

    third = _tick(defs, instance, store, second.cursor)
    assert third.asset_events == [] and third.dynamic_partitions_requests == []

    weights = tiny_home / "inputs" / "tiny-llama" / "model.safetensors"
    old = _events(first)[("model_files", "tiny-llama")]
    mtime = weights.stat().st_mtime_ns
    weights.write_bytes(
        weights.read_bytes()[:-4] + b"\x00\x00\x00\x40"
    )  # last float (a norm weight, 1.0) -> 2.0
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))  # a later write (filesystems may round mtimes)
    fourth = _tick(defs, instance, store, third.cursor)
    (version,) = [v for (k, _), v in _events(fourth).items() if k == "model_files"]
    assert version != old
    assert set(_events(fourth)) == {("model_files", "tiny-llama")}


def test_editing_the_user_canary_file_rebuilds_canaries_and_everything_after(
    tiny_home, tmp_path, monkeypatch
):
    """canaries.file is observed as the canary_file source; a new version re-triggers the canaries,
    the subject model and what follows (not the base model or corpus), without reloading definitions."""
    from memkfac.fingerprint import sha256_file
    from tests.dagster.test_dagster_assets_extra import _config, _definitions, _secrets, _write_jsonl
    from tests.dagster.test_dagster_automation import T0, _cascade, _materialize_everything

    user_file = _write_jsonl(tiny_home / "inputs" / "secrets.jsonl", _secrets())
    _config(tmp_path, monkeypatch, lambda raw: raw.update(canaries={"file": "inputs/secrets.jsonl"}))
    defs, instance = _definitions(), dg.DagsterInstance.ephemeral()
    store = ArtifactStore(home=str(tiny_home))
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("canaries")).parent_keys == {dg.AssetKey("canary_file")}
    _write_jsonl(store.probe_file("canaries"), _secrets())  # what the canaries asset writes

    def observe(cursor):
        result = _tick(defs, instance, store, cursor)
        for event in result.asset_events:  # what Dagster does with a sensor's asset events
            instance.report_runless_asset_event(event)
        return result

    first = observe(None)
    assert _events(first)[("canary_file", None)] == sha256_file(user_file)
    assert instance.get_dynamic_partitions("probe_set") == ["canaries"]
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=T0)
    _materialize_everything(defs, instance)
    for minute in range(1, 4):
        result = dg.evaluate_automation_conditions(
            defs=defs,
            instance=instance,
            cursor=result.cursor,
            evaluation_time=T0 + dt.timedelta(minutes=minute),
        )
    assert result.total_requested == 0
    assert observe(first.cursor).asset_events == []

    mtime = user_file.stat().st_mtime_ns
    _write_jsonl(user_file, _secrets(n_per_group=3))
    os.utime(user_file, ns=(mtime + 10**9, mtime + 10**9))  # a later write (filesystems may round mtimes)
    assert _events(observe(first.cursor)) == {("canary_file", None): sha256_file(user_file)}
    requested = _cascade(defs, instance, result.cursor, T0 + dt.timedelta(minutes=10))
    variants = set(graph.get(dg.AssetKey("edited_model")).partitions_def.get_partition_keys())
    assert requested["canaries"] == {"None"} and requested["probe_sets"] == {"canaries"}
    assert requested["subject_model"] == {"tiny-llama"}
    assert requested["edited_model"] == variants
    assert requested["memorization_eval"] == {f"canaries|{v}" for v in variants}
    assert "reports/forgetting_by_variant" in requested
    assert "base_model" not in requested and "corpus" not in requested


def test_model_version_of_each_kind_of_source(tmp_path):
    """A hub id is versioned by its id, so its base model is built (and fails clearly when offline)
    instead of never being requested; a path that does not exist has no version."""
    from assets.sources import model_version
    from memkfac.models import BUILTIN_MODELS

    assert model_version("allenai/OLMo-2-1124-7B") == "hub:allenai/OLMo-2-1124-7B"
    assert model_version("smollm2-135m") == BUILTIN_MODELS["smollm2-135m"].sha256
    assert model_version(str(tmp_path / "missing" / "model")) is None


def test_comparison_reports_show_in_the_ui_with_their_figure(tiny_defs, tiny_home):
    """A `memkfac compare` report under MEMKFAC_HOME/reports becomes a runless materialization of
    comparison_report with its figure, tables and row count; a user's Markdown file does not."""
    from memkfac.champion import plot_recall_vs_perplexity
    from memkfac.compare import REPORT_HEADER

    defs, _, _ = tiny_defs
    instance = dg.DagsterInstance.ephemeral()
    store = ArtifactStore(home=str(tiny_home))
    sensor = defs.resolve_sensor_def("comparison_reports")

    def tick(cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"store": store}, definitions=defs
        )
        result = sensor(context)
        for event in result.asset_events:  # what Dagster does with a sensor's asset events
            instance.report_runless_asset_event(event)
        return result

    assert tick(None).asset_events == []  # no reports directory yet
    reports = store.root / "reports"
    reports.mkdir()
    (reports / "notes.md").write_text("# my notes\n")
    report = reports / "comparison-canaries.md"
    report.write_text(REPORT_HEADER + "| method | strict % |\n|---|---|\n| K-FAC | 3.1 |\n")
    report.with_suffix(".json").write_text(json.dumps([{"variant": "base"}, {"variant": "kfac"}]))
    first = tick(None)
    (event,) = first.asset_events
    assert event.asset_key == dg.AssetKey("comparison_report") and event.description == report.name
    assert event.metadata["dagster/row_count"].value == 2
    assert "| K-FAC | 3.1 |" in event.metadata["report"].value
    assert REPORT_HEADER not in event.metadata["report"].value
    assert "recall_vs_perplexity" not in event.metadata  # the figure is not written yet

    assert tick(first.cursor).asset_events == []
    plot_recall_vs_perplexity([("base", 14.0, 96.9), ("K-FAC", 15.0, 0.0)], report.with_suffix(".png"), "t")
    (event,) = tick(first.cursor).asset_events
    assert event.metadata["recall_vs_perplexity"].value.startswith("![recall against perplexity")
    latest = instance.get_latest_materialization_event(dg.AssetKey("comparison_report"))
    assert "recall_vs_perplexity" in latest.asset_materialization.metadata
