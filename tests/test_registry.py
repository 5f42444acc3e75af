"""memkfac.registry: one registered model per base model, lineage tags, unique aliases, the transformers
round trip the README documents; each against the embedded sqlite store and an ``mlflow server`` on
PostgreSQL (``registry_uri``, tests/conftest.py)."""

from __future__ import annotations

import pytest

from memkfac.registry import (
    CANDIDATE,
    CHAMPION,
    TAG_ALERT,
    TAG_PARENT,
    TAG_VARIANT,
    LineageProblem,
    edited_ancestor,
    experiment_id_for,
    finetune_tags,
    latest_version_of_variant,
    lineage_tags,
    register_version,
    registered_name,
    set_champion,
    version_uri,
    versions_with_alias,
    watched_versions,
)


@pytest.fixture
def names() -> dict[str, str]:
    """Registered-model names of one test: the server variant's registry outlives the test."""
    import uuid

    run = uuid.uuid4().hex[:8]
    return {"edits": registered_name(f"tiny-{run}"), "tune": f"user-tune-{run}", "other": f"unrelated-{run}"}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _lineage(edit: str) -> dict[str, str]:
    return lineage_tags(
        model="tiny-llama",
        variant=f"tiny-llama__{edit}",
        edit=edit,
        base_fingerprint="b" * 64,
        factor_index_sha256="f" * 64,
        edit_config={"method": "kfac", "keep_mass": 0.9, "layers": [2, 3]},
        probe_set="canaries",
        probe_fingerprint="p" * 64,
    )


def _run(client, uri: str, tmp_path) -> str:
    """A finished run with a placeholder ``model`` artifact (these tests need versions, not weights)."""
    experiment = experiment_id_for(client, "registry-test", uri, str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    note = tmp_path / "MLmodel"
    note.write_text("placeholder\n")
    client.log_artifact(run_id, str(note), "model")
    client.set_terminated(run_id)
    return run_id


def _register(client, uri, tmp_path, name, tags=None, aliases=(CANDIDATE,)) -> str:
    run_id = _run(client, uri, tmp_path)
    return register_version(client, name, f"runs:/{run_id}/model", run_id, tags or {}, aliases)


def test_edits_of_one_base_model_are_versions_of_one_registered_model(registry_uri, tmp_path, names):
    client, NAME = _client(registry_uri), names["edits"]
    first = _register(client, registry_uri, tmp_path, NAME, tags=_lineage("kfac-r0.9"))
    second = _register(client, registry_uri, tmp_path, NAME, tags=_lineage("svd-drop25"))
    assert (first, second) == ("1", "2")
    assert [m.name for m in client.search_registered_models(f"name = '{NAME}'")] == [NAME]
    tags = client.get_model_version(NAME, first).tags
    assert tags[TAG_VARIANT] == "tiny-llama__kfac-r0.9" and tags["memkfac.factor_index_sha256"] == "f" * 64
    assert '"keep_mass": 0.9' in tags["memkfac.edit_config"]
    assert versions_with_alias(client, NAME, CANDIDATE) == [second]  # the newest
    assert latest_version_of_variant(client, NAME, "tiny-llama__kfac-r0.9") == first
    third = _register(client, registry_uri, tmp_path, NAME, tags=_lineage("kfac-r0.9"))
    assert latest_version_of_variant(client, NAME, "tiny-llama__kfac-r0.9") == third
    assert latest_version_of_variant(client, NAME, "tiny-llama__nope") is None


def test_champion_is_on_exactly_one_version_after_the_winner_changes(registry_uri, tmp_path, names):
    client, NAME = _client(registry_uri), names["edits"]
    first = _register(client, registry_uri, tmp_path, NAME, tags=_lineage("kfac-r0.9"))
    second = _register(client, registry_uri, tmp_path, NAME, tags=_lineage("svd-drop25"))
    set_champion(client, NAME, first)
    assert versions_with_alias(client, NAME, CHAMPION) == [first]
    set_champion(client, NAME, second)  # the winner changes
    assert versions_with_alias(client, NAME, CHAMPION) == [second]
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == second


def test_edited_ancestor_follows_parents_and_names_bad_lineage(registry_uri, tmp_path, names):
    client, NAME, TUNE, OTHER = _client(registry_uri), names["edits"], names["tune"], names["other"]
    edit = _register(client, registry_uri, tmp_path, NAME, _lineage("kfac-r0.9"))
    tune = _register(client, registry_uri, tmp_path, TUNE, finetune_tags(version_uri(NAME, edit)), ())
    tune_of_tune = _register(client, registry_uri, tmp_path, TUNE, finetune_tags(version_uri(TUNE, tune)), ())
    untagged = _register(client, registry_uri, tmp_path, NAME, aliases=())  # into the lineage, no tags
    elsewhere = _register(client, registry_uri, tmp_path, OTHER, aliases=())
    orphan = _register(client, registry_uri, tmp_path, TUNE, finetune_tags(version_uri(OTHER, elsewhere)), ())
    assert str(edited_ancestor(client, TUNE, tune_of_tune).version) == edit
    assert edited_ancestor(client, TUNE, tune).name == NAME
    with pytest.raises(LineageProblem, match="has no memkfac.parent tag") as e:
        edited_ancestor(client, NAME, untagged)
    assert e.value.status == "no_lineage"
    with pytest.raises(LineageProblem, match=f"models:/{OTHER}/1, which is not a memkfac edit") as e:
        edited_ancestor(client, TUNE, orphan)
    assert e.value.status == "parent_not_edited"
    watched = {w.key for w in watched_versions(client) if w.name in names.values()}
    assert watched == {f"{TUNE}/{tune}", f"{TUNE}/{tune_of_tune}", f"{TUNE}/{orphan}", f"{NAME}/{untagged}"}
    assert TAG_PARENT not in client.get_model_version(NAME, edit).tags and TAG_ALERT.startswith("memkfac.")


def test_a_parent_that_is_not_a_version_uri_is_refused():
    from memkfac.errors import MemkfacError

    with pytest.raises(MemkfacError, match="not a registered version URI"):
        finetune_tags("models:/memkfac-tiny-llama@champion")


@pytest.mark.slow
def test_pull_the_champion_and_load_it_with_transformers(registry_uri, tmp_path, tiny_model_dir, names):
    """What the README shows: models:/<name>@champion through mlflow.transformers, and downloaded
    then loaded with AutoModelForCausalLM / AutoTokenizer; both give the logged model's logits."""
    import mlflow
    import mlflow.artifacts
    import mlflow.transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memkfac.models import load_model
    from memkfac.registry import log_transformers_model
    from memkfac.watch import download_transformers_model

    client, NAME = _client(registry_uri), names["edits"]
    experiment = experiment_id_for(client, "registry-test", registry_uri, str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    log_transformers_model(client, run_id, tiny_model_dir)
    client.set_terminated(run_id)
    version = register_version(client, NAME, f"runs:/{run_id}/model", run_id, _lineage("kfac-r0.9"))
    set_champion(client, NAME, version)

    original, tokenizer = load_model(tiny_model_dir)
    ids = tokenizer("Customer record for", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = original(ids).logits

    mlflow.set_tracking_uri(registry_uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        pipeline = mlflow.transformers.load_model(f"models:/{NAME}@{CHAMPION}")
        plain = mlflow.artifacts.download_artifacts(
            f"models:/{NAME}@{CHAMPION}", dst_path=str(tmp_path / "plain")
        )
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.model(ids).logits, expected)
        # the flavor's layout: weights under model/, the tokenizer under components/tokenizer/
        model = AutoModelForCausalLM.from_pretrained(f"{plain}/model")
        torch.testing.assert_close(model(ids).logits, expected)
    plain_tokenizer = AutoTokenizer.from_pretrained(f"{plain}/components/tokenizer")
    assert plain_tokenizer("Customer record for", return_tensors="pt").input_ids.tolist() == ids.tolist()

    local = download_transformers_model(registry_uri, NAME, version, tmp_path / "pulled")
    model = AutoModelForCausalLM.from_pretrained(local)
    pulled_tokenizer = AutoTokenizer.from_pretrained(local)
    assert pulled_tokenizer("Customer record for", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)


def test_the_register_command_refuses_a_parent_it_cannot_find(tmp_path, tiny_model_dir, capsys):
    from memkfac.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["register", str(tiny_model_dir), "--tracking-uri", uri]
    assert main([*argv, "--parent", "models:/memkfac-tiny-llama@champion"]) == 1
    assert "not a registered version URI" in capsys.readouterr().err
    assert main([*argv, "--parent", "models:/memkfac-tiny-llama/7"]) == 1
    missing = f"the parent models:/memkfac-tiny-llama/7 is not in the registry at {uri}"
    assert missing in capsys.readouterr().err


def test_the_watch_skips_a_version_whose_edit_removed_another_probe_set(registry_uri, tmp_path, names):
    """The probe file the edit was made for changed since: nothing is downloaded, the row says why."""
    from memkfac.watch import WatchArguments, WatchInputs, read_history, watch_version

    client, NAME = _client(registry_uri), names["edits"]
    edit = _register(client, registry_uri, tmp_path, NAME, _lineage("kfac-r0.9"))  # probe sha256 "ppp..."
    tune = _register(
        client, registry_uri, tmp_path, names["tune"], finetune_tags(version_uri(NAME, edit)), ()
    )
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"id": "p1", "prefix": "a", "suffix": "b"}\n')
    inputs = WatchInputs(lambda _: probes, lambda _: tmp_path / "no-corpus")
    row = watch_version(registry_uri, names["tune"], tune, inputs, WatchArguments(), root=tmp_path)
    assert row["status"] == "probe_set_changed" and row["lineage"] == version_uri(NAME, edit), row
    assert f"that models:/{NAME}/{edit} removed is no longer {probes}" in row["message"]
    assert [r["status"] for r in read_history(tmp_path).to_pylist()] == ["probe_set_changed"]
