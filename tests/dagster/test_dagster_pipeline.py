"""The whole graph on the tiny config, through the main job's code path (checks, dbt, MLflow included),
with a ``compute`` section whose per-step overrides every model-running step must receive."""

from __future__ import annotations

import importlib
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from resources.config import COMPUTE_STEPS
from tests.dagster.conftest import TINY_CONFIG, tiny_pipeline
from tests.dagster.test_dagster_definitions import BLOCKING_CHECKS, MIA_REPORT_CHECKS

pytestmark = pytest.mark.slow


# the engine function each model-running asset calls, and the step whose compute settings it must get
SPIED = {
    "memkfac.inject.inject_canaries": "injection",
    "memkfac.eigen.compute_eigenbasis": "eigenbasis",
    "memkfac.methods.apply_edit": "edits",
    "memkfac.methods.check_edited_model": "edits",
    "memkfac.models.load_model": "memorization_eval",  # the asset loads the model evaluate_model runs
    "memkfac.evaluate.evaluate_utility": "utility_eval",
    "memkfac.downstream.evaluate_downstream": "downstream",
    "memkfac.bands.run_band_analysis": "bands",
    "memkfac.resurgence.run_resurgence": "resurgence",
}
PER_STEP = {
    "device": "cpu",
    "dtype": "float32",
    "threads": 1,
    "steps": {"memorization_eval": {"dtype": "bfloat16"}, "utility_eval": {"dtype": "bfloat16"}},
}


def _spy(mp: pytest.MonkeyPatch, calls: dict[str, list[tuple]]) -> None:
    """Wrap each ``SPIED`` function to record the (device, dtype) it is called with, then run it."""
    for path, step in SPIED.items():
        module, name = path.rsplit(".", 1)
        real = getattr(importlib.import_module(module), name)

        def wrapper(*args, _real=real, _name=name, _step=step, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if _name == "evaluate_downstream":
                calls[_step].append((args[1].device, args[1].dtype))
            elif _name != "load_model" or caller == "memorization_eval":  # engine-internal loads aside
                calls[_step].append((str(kwargs.get("device")), kwargs.get("dtype", "-")))
            return _real(*args, **kwargs)

        mp.setattr(importlib.import_module(module), name, wrapper)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run ``jobs.main.run_pipeline`` once on the tiny config with ``PER_STEP`` as its ``compute``
    section, recording what each model-running step got; yield what the tests inspect."""
    from jobs.main import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(TINY_CONFIG.read_text()) | {"compute": PER_STEP}))
    with tiny_pipeline(root / "run", MEMKFAC_CONFIG=str(config)) as p, pytest.MonkeyPatch.context() as mp:
        p["calls"] = {step: [] for step in SPIED.values()}
        _spy(mp, p["calls"])
        p["log"] = []
        p["failed"] = run_pipeline(p["defs"], p["instance"], p["store"], log=p["log"].append)
        mp.undo()
        yield p


def test_every_model_running_step_gets_its_device_and_dtype(pipeline):
    dtype_of = {"memorization_eval": "bfloat16", "utility_eval": "bfloat16"}
    for step, seen in pipeline["calls"].items():
        assert seen, (step, "\n".join(pipeline["log"]))
        dtype = dtype_of.get(step, "float32") if COMPUTE_STEPS[step] else "-"
        assert set(seen) == {("cpu", dtype)}, (step, seen)
    import dagster as dg

    factors = pipeline["instance"].get_latest_materialization_event(dg.AssetKey("kfac_factors"))
    metadata = factors.asset_materialization.metadata
    assert (metadata["device"].value, metadata["dtype"].value) == ("cpu", "float32")


def test_every_asset_partition_materializes(pipeline):
    assert pipeline["failed"] == [], "\n".join(pipeline["log"])
    defs, instance = pipeline["defs"], pipeline["instance"]
    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        partitions = (
            node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            if node.partitions_def
            else [None]
        )
        done = instance.get_materialized_partitions(key) if node.partitions_def else None
        if node.partitions_def:
            assert set(partitions) <= done, (key, set(partitions) - done)
        else:
            assert instance.get_latest_materialization_event(key) is not None, key


def test_blocking_checks_ran_and_passed(pipeline):
    instance, defs = pipeline["instance"], pipeline["defs"]
    graph = defs.resolve_asset_graph()
    names = BLOCKING_CHECKS | {"positional_stress_table_valid"}  # tiny.yaml: evaluation.stress on
    assert names | MIA_REPORT_CHECKS <= {c.name for c in graph.asset_check_keys}
    for check_key in graph.asset_check_keys:
        if check_key.name not in names and check_key.asset_key.path[0] != "reports":
            continue
        history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=50)
        assert history, check_key
        latest = {}  # newest first: a report retried after a failed attempt has a stale planned record
        for record in history:
            latest.setdefault(record.partition, record)
        for record in latest.values():
            assert record.status.value == "SUCCEEDED", (check_key, record.partition, record.evaluation)


def test_tables_and_reports(pipeline):
    import duckdb

    store, config = pipeline["store"], pipeline["config"]
    for variant in config.variants:
        table = pq.read_table(store.eval_table("memorization", variant, "canaries"))
        assert table.num_rows == config.canaries.n_trained + config.canaries.n_control
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        rows = con.execute(
            "select r.variant, r.split, r.strict_pct, f.strict_pct "
            "from main_reports.recall_vs_perplexity as r join main_reports.forgetting_by_variant as f "
            "on f.variant = r.variant and f.probe_set = r.probe_set and f.kind = 'memorized' "
            "and f.split = 'holdout' order by r.variant"
        ).fetchall()
        assert [r[0] for r in rows] == sorted(config.variants)
        assert all(split == "holdout" and got == holdout for _, split, got, holdout in rows), rows
        retention = con.execute("select distinct variant from main_reports.downstream_retention").fetchall()
        assert sorted(r[0] for r in retention) == sorted(v for v in config.variants if "__base" not in v)
        steps = con.execute(
            "select distinct steps from main_reports.resurgence_curves order by steps"
        ).fetchall()
        assert [s[0] for s in steps] == [0, *config.resurgence.arguments.steps]
        auc = con.execute(
            "select variant, count(*), count(base_auc), max(abs(base_auc - auc - auc_drop)) "
            "from main_reports.mia_auc_by_variant group by variant order by variant"
        ).fetchall()
        assert auc == [(v, 4, 4, 0.0) for v in sorted(config.variants)]  # 4 scores, base AUC beside each
        tpr = con.execute(
            "select count(tpr_at_1pct_fpr), count(base_tpr_at_1pct_fpr) from main_reports.mia_auc_by_variant"
        ).fetchone()
        assert tpr == (4 * len(config.variants),) * 2
        field = con.execute(
            "select variant, count(*), count(verbmem), count(exact_memorization), "
            "count(extraction_strength), count(base_extraction_strength) "
            "from main_reports.forgetting_by_variant group by all order by all"
        ).fetchall()
        assert [r[0] for r in field] == sorted(config.variants)
        assert all(n > 0 and counts == [n] * 4 for _, n, *counts in field)  # the base's beside each


def test_mlflow_registry_round_trip(pipeline):
    """The edits of the tiny model are versions of memkfac-tiny-llama with their lineage; champion is
    on one version; models:/<name>@champion loads with mlflow.transformers."""
    import mlflow
    import mlflow.transformers

    from memkfac.registry import (
        CANDIDATE,
        CHAMPION,
        TAG_FACTOR_INDEX,
        TAG_PROBE_FINGERPRINT,
        TAG_VARIANT,
        versions_with_alias,
    )

    uri = pipeline["settings"].mlflow_uri(pipeline["config"])
    name = "memkfac-tiny-llama"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        generator = mlflow.transformers.load_model(f"models:/{name}@{CHAMPION}")
        text = generator("Customer record for", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert text.startswith("Customer record for") and len(text) > len("Customer record for")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    (model,) = client.search_registered_models()  # every edit of the one base model
    assert model.name == name
    versions = client.search_model_versions(f"name = '{name}'")
    edits = [v for v in pipeline["config"].variants if "__base" not in v]
    assert sorted(v.tags[TAG_VARIANT] for v in versions) == sorted(edits)
    kfac = next(v for v in versions if v.tags[TAG_VARIANT] == "tiny-llama__kfac-r0.9")
    assert len(kfac.tags[TAG_FACTOR_INDEX]) == 64 and len(kfac.tags[TAG_PROBE_FINGERPRINT]) == 64
    assert client.get_run(kfac.run_id).data.params["keep_mass"] == "0.9"
    assert len(versions_with_alias(client, name, CHAMPION)) == 1
    assert versions_with_alias(client, name, CANDIDATE) == [str(max(int(v.version) for v in versions))]
    run = client.get_run(kfac.run_id)
    kinds = {r.data.tags.get("kind") for r in client.search_runs([run.info.experiment_id])}
    assert kinds == {"edit", "evaluation", "resurgence"}


def test_rerun_recomputes_nothing(pipeline):
    from jobs.main import run_pipeline

    instance = pipeline["instance"]
    before = len(instance.get_runs())
    log: list[str] = []
    assert run_pipeline(pipeline["defs"], instance, pipeline["store"], log=log.append) == []
    assert len(instance.get_runs()) == before, log
