"""The resurgence watch on the tiny config: the registry_watch sensor, the watch_history asset and its
check, against the embedded sqlite registry and an ``mlflow server`` on PostgreSQL.

The registry holds an "edit" of the tiny model (the tiny random model itself, registered with the
lineage tags of an edit: it recites none of the canaries, as a successful edit would), and what users
register downstream of it: a fine-tune on the removed canaries (it recites them again), a benign
fine-tune on general text, and three bad versions (no lineage tags, a parent that is no edit, a
version whose model files are missing).
"""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from tests.conftest import postgres_database
from tests.dagster.conftest import TINY_CONFIG, tiny_pipeline

MODEL = "tiny-llama"
_NAMES = ("memkfac-tiny-llama", "someone-else")  # the registered models this module writes


def _finetune(model_dir, sequences, out, epochs: int, lr: float) -> None:
    from memkfac.arguments import FinetuneArguments
    from memkfac.finetune import finetune, mixed_batches
    from memkfac.models import load_model

    model, tokenizer = load_model(model_dir)
    plan = mixed_batches([(sequences, 8)], tokenizer.pad_token_id, seed=0)
    finetune(model, plan, FinetuneArguments(epochs=epochs, lr=lr, warmup_steps=5), progress=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _placeholder_version(mlflow, name: str, tags: dict, tmp) -> str:
    """A version whose run holds no model: only an MLmodel placeholder."""
    from memkfac.registry import register_version

    client = mlflow.client()
    from memkfac.registry import experiment_id_for

    run_id = client.create_run(
        experiment_id_for(client, mlflow.experiment, mlflow.tracking_uri, mlflow.artifact_root)
    ).info.run_id
    note = tmp / "MLmodel"
    note.write_text("no weights here\n")
    client.log_artifact(run_id, str(note), "model")
    client.set_terminated(run_id)
    return register_version(client, name, f"runs:/{run_id}/model", run_id, tags, aliases=())


def _tick(defs, instance, mlflow, cursor=None):
    sensor = defs.resolve_sensor_def("registry_watch")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mlflow": mlflow})
    result = sensor(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _execute(defs, instance, key: str):
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("watch_history")], partition_key=key
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres-server"])
def watched(request, tmp_path_factory):
    from memkfac.canaries import canary_probes
    from memkfac.corpora import build_corpus, load_split
    from memkfac.fingerprint import model_fingerprint, sha256_file
    from memkfac.methods import probe_sequences
    from memkfac.models import load_tokenizer
    from memkfac.probes import write_probe_set
    from memkfac.registry import (
        CANDIDATE,
        CHAMPION,
        TAG_PARENT,
        lineage_tags,
        register_finetune,
        registered_name,
        version_uri,
    )

    root = tmp_path_factory.mktemp(f"watch-{request.param}")
    uri = (
        f"sqlite:///{root / 'mlflow.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_mlflow_server")
    )
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["mlflow"] = {"tracking_uri": uri}
    config_path = root / "tiny-watch.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    with tiny_pipeline(root, MEMKFAC_CONFIG=str(config_path)) as p:
        store, config, mlflow = p["store"], p["config"], p["defs"].resources["mlflow"]
        assert mlflow.tracking_uri == uri
        base = p["home"] / "inputs" / MODEL
        tokenizer = load_tokenizer(base)
        probes = canary_probes(config.canary_source, "canaries")
        removed = [q for q in probes if q.kind == "memorized"]
        probe_file = write_probe_set(probes, store.validated_probes("canaries"))
        build_corpus(config.corpus, tokenizer, store.corpus_dir(MODEL), progress=False)

        name = registered_name(MODEL)
        run_id = mlflow.log_run("edit", {}, {}, {"kind": "edit"}, model_dir=base)
        tags = lineage_tags(
            model=MODEL,
            variant=f"{MODEL}__kfac-r0.9",
            edit="kfac-r0.9",
            base_fingerprint=model_fingerprint(base),
            factor_index_sha256="0" * 64,
            edit_config={"method": "kfac", "keep_mass": 0.9},
            probe_set="canaries",
            probe_fingerprint=sha256_file(probe_file),
        )
        edit = mlflow.register(name, run_id, tags, aliases=(CANDIDATE, CHAMPION))
        parent = version_uri(name, edit)

        _finetune(base, probe_sequences(removed, tokenizer), root / "recites", epochs=60, lr=1e-2)
        general = load_split(store.corpus_dir(MODEL), "finetune")[:8].tolist()
        _finetune(base, general, root / "benign", epochs=1, lr=1e-4)
        versions = {
            "recites": register_finetune(uri, root / "recites", parent),
            "benign": register_finetune(uri, root / "benign", parent),
            "no_lineage": version_uri(name, _placeholder_version(mlflow, name, {}, root)),
            "parent_not_edited": version_uri(
                "someone-else",
                _placeholder_version(
                    mlflow,
                    "someone-else",
                    {
                        TAG_PARENT: version_uri(
                            "someone-else", _placeholder_version(mlflow, "someone-else", {}, root)
                        )
                    },
                    root,
                ),
            ),
            "load_failed": version_uri(name, _placeholder_version(mlflow, name, {TAG_PARENT: parent}, root)),
        }
        keys = {what: uri_[len("models:/") :] for what, uri_ in versions.items()}
        first = _tick(p["defs"], p["instance"], mlflow)
        second = _tick(p["defs"], p["instance"], mlflow, cursor=first.cursor)
        results = {key: _execute(p["defs"], p["instance"], key) for key in sorted(set(keys.values()))}
        report = _report(p["defs"], p["instance"])
        yield p | {
            "uri": uri,
            "name": name,
            "versions": versions,
            "keys": keys,
            "n_removed": len(removed),
            "first": first,
            "second": second,
            "results": results,
            "report": report,
        }


def _report(defs, instance):
    """Build the dbt model recall_over_time (and its tests); its rows, oldest first."""
    import duckdb

    from memkfac.paths import memkfac_home
    from resources.store import ArtifactStore

    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(["reports", "recall_over_time"])]
    )
    assert result.success
    store = ArtifactStore(home=str(memkfac_home()))  # the env of tiny_pipeline / tiny_defs
    with duckdb.connect(str(store.duckdb_path), read_only=True) as con:
        cursor = con.execute("select * from main_reports.recall_over_time order by evaluated_at")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _check(result):
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def _history(watched):
    from memkfac.watch import read_history

    rows = read_history(watched["store"].root).to_pylist()
    return {f"{r['registered_model']}/{r['version']}": r for r in rows}


@pytest.mark.slow
def test_the_sensor_requests_each_watched_version_once(watched):
    first, keys = watched["first"], set(watched["keys"].values())
    assert isinstance(first, dg.SensorResult)
    sensor = watched["defs"].resolve_sensor_def("registry_watch")
    assert sensor.minimum_interval_seconds == watched["config"].watch.interval_seconds == 300
    # the server variant's registry also holds tests/test_registry.py's versions: compare ours
    ours = {r.partition_key for r in first.run_requests if r.partition_key.split("/")[0] in _NAMES}
    assert ours == keys and len(first.run_requests) == len(set(json.loads(first.cursor)))
    assert isinstance(watched["second"], dg.SkipReason)  # nothing new on the next tick
    assert "no new version" in watched["second"].skip_message
    assert all(r.success for r in watched["results"].values())  # bad versions do not stop the watch


@pytest.mark.slow
def test_a_fine_tune_that_recites_the_removed_canaries_fails_the_check_naming_it(watched):
    from memkfac.registry import TAG_ALERT

    key = watched["keys"]["recites"]
    row = _history(watched)[key]
    assert row["status"] == "ok" and row["alert"], row
    assert row["removed_n"] == watched["n_removed"] and row["removed_strict_pct"] > 20.0
    assert row["lineage"] == f"models:/{watched['name']}/1" and row["variant"] == f"{MODEL}__kfac-r0.9"
    assert row["perplexity"] > 1 and row["mia_auc"] is not None
    check = _check(watched["results"][key])
    recites = f"recites {row['removed_strict_k']} of {watched['n_removed']} removed canaries"
    assert not check.passed and f"models:/{key} {recites}" in check.description
    name, version = key.rsplit("/", 1)
    client = watched["defs"].resources["mlflow"].client()
    assert client.get_model_version(name, version).tags[TAG_ALERT] == recites


@pytest.mark.slow
def test_a_benign_fine_tune_passes(watched):
    from memkfac.registry import TAG_ALERT

    key = watched["keys"]["benign"]
    row = _history(watched)[key]
    assert row["status"] == "ok" and not row["alert"] and row["removed_strict_pct"] <= 20.0, row
    check = _check(watched["results"][key])
    assert check.passed and f"models:/{key} recites {row['removed_strict_k']} of" in check.description
    name, version = key.rsplit("/", 1)
    assert TAG_ALERT not in watched["defs"].resources["mlflow"].client().get_model_version(name, version).tags


@pytest.mark.slow
@pytest.mark.parametrize("status", ["no_lineage", "parent_not_edited", "load_failed"])
def test_a_bad_version_is_recorded_with_its_status_and_warns(watched, status):
    key = watched["keys"][status]
    row = _history(watched)[key]
    assert row["status"] == status and row["message"], row
    edited = f"models:/{watched['name']}/1"
    assert row["lineage"] == (edited if status == "load_failed" else None)  # known before the download
    check = _check(watched["results"][key])
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert f"models:/{key} was not evaluated ({status})" in check.description


@pytest.mark.slow
def test_history_is_appended_never_overwritten(watched):
    from memkfac.watch import read_history

    key = watched["keys"]["benign"]
    before = read_history(watched["store"].root).num_rows
    _execute(watched["defs"], watched["instance"], key)
    rows = [
        r
        for r in read_history(watched["store"].root).to_pylist()
        if f"{r['registered_model']}/{r['version']}" == key
    ]
    assert read_history(watched["store"].root).num_rows == before + 1
    assert len(rows) == 2 and rows[0]["evaluated_at"] < rows[1]["evaluated_at"]
    assert rows[0]["removed_strict_pct"] == rows[1]["removed_strict_pct"]  # same model, same probes


@pytest.mark.slow
def test_recall_over_time_lists_every_evaluation_per_lineage(watched):
    rows, keys = watched["report"], watched["keys"]
    assert sorted(r["registered_version"] for r in rows) == sorted(keys.values())
    lineage = f"models:/{watched['name']}/1"
    evaluated = [r for r in rows if r["status"] == "ok"]
    assert {r["lineage"] for r in evaluated} == {lineage}
    assert [r["evaluation_in_lineage"] for r in evaluated] == [1, 2]
    (recites,) = [r for r in evaluated if r["registered_version"] == keys["recites"]]
    assert recites["alert"] and recites["removed_strict_pct"] > 20.0


@pytest.mark.slow
def test_recall_over_time_is_empty_before_any_evaluation(tiny_defs):
    rows = _report(tiny_defs[0], dg.DagsterInstance.ephemeral())
    assert rows == []


def test_an_unreachable_registry_is_recorded_and_skipped(tiny_defs, tmp_path, monkeypatch):
    import socket

    from memkfac.watch import WatchArguments, WatchInputs, read_history, watch_version
    from resources.mlflow_registry import MlflowRegistry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    nowhere = WatchInputs(lambda _: tmp_path / "none.jsonl", lambda _: tmp_path / "none")
    row = watch_version(uri, "memkfac-tiny-llama", "3", nowhere, WatchArguments(), root=tmp_path)
    assert row["status"] == "registry_unreachable" and f"127.0.0.1:{port}" in row["message"], row
    assert [r["status"] for r in read_history(tmp_path).to_pylist()] == ["registry_unreachable"]
    result = _tick(tiny_defs[0], dg.DagsterInstance.ephemeral(), MlflowRegistry(tracking_uri=uri))
    assert isinstance(result, dg.SkipReason) and f"{uri} is unreachable" in result.skip_message


@pytest.fixture
def dagster_postgres_url():
    with postgres_database("watch_dagster", "the team instance test") as url:
        yield url


def test_a_dagster_instance_on_postgres_holds_the_watch_tick_and_run(
    tiny_defs, dagster_postgres_url, tmp_path
):
    """The team instance (dagster.team.yaml.example): the watch's partitions and its run live in
    PostgreSQL storage."""
    from memkfac.registry import registered_name
    from memkfac.watch import read_history

    defs = tiny_defs[0]
    mlflow = defs.resources["mlflow"]
    version = _placeholder_version(mlflow, registered_name(MODEL), {}, tmp_path)  # no lineage tags
    key = f"{registered_name(MODEL)}/{version}"
    storage = {"storage": {"postgres": {"postgres_url": dagster_postgres_url}}}
    with dg.instance_for_test(overrides=storage) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = _tick(defs, instance, mlflow)
        assert [r.partition_key for r in result.run_requests] == [key]
        assert instance.get_dynamic_partitions("registry_version") == [key]
        run = _execute(defs, instance, key)
        assert run.success
        assert instance.get_run_by_id(run.run_id).is_success
        assert key in instance.get_materialized_partitions(dg.AssetKey("watch_history"))
    (row,) = read_history().to_pylist()
    assert row["status"] == "no_lineage"
