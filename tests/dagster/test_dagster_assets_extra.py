"""Asset-level gaps of the Dagster layer on the tiny config: canaries from a user's probe-set file,
the edited-model check's probe batch, and the MIA and positional-stress tables of memorization_eval."""

from __future__ import annotations

import json
import re

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml

from tests.dagster.conftest import TINY_CONFIG

BASE = "tiny-llama__base"


def _secrets(n_per_group: int = 4) -> list[dict]:
    """A user's probe set, shaped unlike the generated canaries: sweep, holdout and control probes."""
    groups = [("memorized", "sweep"), ("memorized", "holdout"), ("control", "holdout")]
    return [
        {
            "id": f"vault-{kind}-{split}-{i}",
            "prefix": f"Vault {kind[:3]}{split[:2]}{i} door code:",
            "suffix": f" {1000 + 37 * i}-kappa-{split}-{i} then turn left twice.",
            "kind": kind,
            "split": split,
        }
        for kind, split in groups
        for i in range(n_per_group)
    ]


def _write_jsonl(path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(tmp_path, monkeypatch, change) -> None:
    """Write a changed copy of configs/tiny.yaml and point MEMKFAC_CONFIG at it."""
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    change(raw)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("MEMKFAC_CONFIG", str(path))


def _base_only(raw: dict) -> None:
    """No edits (so no factors): the unedited variant is enough to exercise the assets here."""
    raw["edits"] = {}
    raw["resurgence"]["edits"] = []


def _definitions():
    from definitions import build_definitions
    from resources.config import load_config
    from resources.settings import Settings

    settings = Settings.from_env()
    return build_definitions(load_config(settings.config_path), settings)


def _execute(defs, instance, assets: list[str], partition: str | None = None):
    """Materialize ``assets`` (and their checks) of one partition in process; return the result."""
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey(a) for a in assets],
        partition_key=partition,
        raise_on_error=False,
    )


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _failure(result) -> str:
    (event,) = [e for e in result.all_events if e.is_step_failure]
    return event.step_failure_data.error.to_string()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"id": 1, "prefix": "a"}], r"(?s)canaries\.file: .*line 1: missing field 'suffix'"),
        (
            [r for r in _secrets() if r["kind"] != "control"],
            r"canaries\.file \(.*s\.jsonl\) has no probes of kind 'control'",
        ),
        (
            [r for r in _secrets() if r["split"] != "sweep"],
            r"has no probes of kind 'memorized' in split 'sweep'",
        ),
    ],
)
def test_bad_canary_file_fails_the_canaries_asset_naming_the_key(
    records, message, tiny_home, tmp_path, monkeypatch
):
    """The user's file is validated once, by the canaries asset; the config only resolves its path
    (tests/dagster/test_dagster_config.py covers a missing file and clashing keys)."""
    _write_jsonl(tiny_home / "inputs" / "s.jsonl", records)
    _config(tmp_path, monkeypatch, lambda raw: raw.update(canaries={"file": "inputs/s.jsonl"}))
    result = _execute(_definitions(), dg.DagsterInstance.ephemeral(), ["canaries"])
    assert not result.success
    assert re.search(message, _failure(result)), _failure(result)


def test_canaries_code_version_follows_the_user_file(tiny_home, tmp_path, monkeypatch):
    """Editing the file changes the canaries' code version, which re-triggers them (automation BUILD)."""
    user_file = _write_jsonl(tiny_home / "inputs" / "secrets.jsonl", _secrets())
    _config(tmp_path, monkeypatch, lambda raw: raw.update(canaries={"file": str(user_file)}))

    def version():
        return _definitions().resolve_asset_graph().get(dg.AssetKey("canaries")).code_version

    before = version()
    assert version() == before
    _write_jsonl(user_file, _secrets(n_per_group=3))
    assert version() != before


@pytest.mark.slow
def test_user_canaries_are_injected_and_evaluated_with_mia_and_stress(tiny_home, tmp_path, monkeypatch):
    from memkfac.checkpoint import load_manifest
    from memkfac.inject import canary_set_fingerprint
    from memkfac.probes import load_probe_set
    from resources.store import ArtifactStore

    user_file = _write_jsonl(tiny_home / "inputs" / "secrets.jsonl", _secrets())

    def change(raw):
        _base_only(raw)
        raw["canaries"] = {"file": "inputs/secrets.jsonl"}  # relative to MEMKFAC_HOME

    _config(tmp_path, monkeypatch, change)
    defs, instance = _definitions(), dg.DagsterInstance.ephemeral()
    store = ArtifactStore(home=str(tiny_home))
    assert _execute(defs, instance, ["canaries"]).success
    user = load_probe_set(user_file)
    assert [p.id for p in load_probe_set(store.probe_file("canaries"))] == [p.id for p in user]
    instance.add_dynamic_partitions("probe_set", ["canaries"])
    assert _execute(defs, instance, ["probe_sets"], "canaries").success
    assert [p.id for p in load_probe_set(store.validated_probes("canaries"))] == [p.id for p in user]

    assert _execute(defs, instance, ["base_model", "corpus", "subject_model"], "tiny-llama").success
    manifest = load_manifest(store.injected_model_dir("tiny-llama"))
    assert (manifest["n_trained"], manifest["n_control"]) == (8, 4)
    assert manifest["canary_set_fingerprint"] == canary_set_fingerprint(user)

    edited = _execute(defs, instance, ["edited_model"], BASE)
    assert _checks(edited) == {"edited_model_valid": True}

    cell = dg.MultiPartitionKey({"variant": BASE, "probe_set": "canaries"})
    result = _execute(defs, instance, ["memorization_eval"], cell)
    assert result.success
    checks = ("memorization_table_valid", "mia_table_valid", "positional_stress_table_valid")
    assert _checks(result) == dict.fromkeys(checks, True)
    ids = sorted(p.id for p in user)
    for table in ("memorization", "mia", "positional_stress"):
        rows = pq.read_table(store.eval_table(table, BASE, "canaries")).to_pylist()
        assert sorted(r["probe_id"] for r in rows) == ids, table
    summary = pq.read_table(store.eval_table("memorization_summary", BASE, "canaries")).to_pylist()
    field = ("verbmem", "exact_memorization", "extraction_strength")
    assert all(0 <= r[m] <= 1 for r in summary for m in field)
    auc = pq.read_table(store.eval_table("mia_auc", BASE, "canaries")).to_pylist()
    assert {r["score"] for r in auc} == {"loss", "zlib_ratio", "min_k", "min_k_pp"}
    assert all((r["n_members"], r["n_nonmembers"]) == (8, 4) for r in auc)
    assert all(0 <= r["tpr_at_1pct_fpr"] <= 1 for r in auc)
    metadata = result.asset_materializations_for_node("memorization_eval")[0].metadata
    assert metadata["mia/row_count"].value == len(user)
    assert metadata["mia_auc/loss"].value == next(r["auc"] for r in auc if r["score"] == "loss")
    loss_tpr = next(r["tpr_at_1pct_fpr"] for r in auc if r["score"] == "loss")
    assert metadata["mia_tpr_at_1pct_fpr/loss"].value == loss_tpr
    trained = next(r for r in summary if (r["kind"], r["split"]) == ("memorized", "all"))
    assert metadata["verbmem/memorized/all"].value == trained["verbmem"]
    assert "stress/perturbed_mean" in metadata


def test_edited_model_check_fails_on_nonfinite_logits_of_a_probe_batch(tiny_home, tmp_path, monkeypatch):
    """The unedited variant of a non-injected model, with no corpus built: the check runs the canaries."""
    import torch
    from safetensors.torch import load_file, save_file

    def change(raw):
        _base_only(raw)
        raw["models"]["tiny-llama"]["inject_canaries"] = False

    _config(tmp_path, monkeypatch, change)
    defs, instance = _definitions(), dg.DagsterInstance.ephemeral()
    assert _execute(defs, instance, ["canaries"]).success
    instance.add_dynamic_partitions("probe_set", ["canaries"])
    assert _execute(defs, instance, ["probe_sets"], "canaries").success
    healthy = _execute(defs, instance, ["edited_model"], BASE)
    assert _checks(healthy) == {"edited_model_valid": True}
    (evaluation,) = healthy.get_asset_check_evaluations()
    assert evaluation.metadata["probes"].value == 8

    weights = tiny_home / "inputs" / "tiny-llama" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    broken = _execute(defs, instance, ["edited_model"], BASE)
    (evaluation,) = broken.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.metadata["problems"].value == ["non-finite logits"]


@pytest.mark.slow
def test_mia_report_puts_the_base_auc_next_to_each_variant(tmp_path, monkeypatch):
    """dbt builds mia_auc_by_variant and runs its tests when some variants have no AUC rows; a bad AUC
    fails the build (the tests are the Dagster checks of the report)."""
    import duckdb
    from dagster_dbt import DbtCliResource
    from dagster_dbt.errors import DagsterDbtCliRuntimeError

    from memkfac.mia import SCORE_ORIENTATION
    from memkfac.tables import make_table, write_table
    from resources.dbt_project import dbt_project
    from resources.settings import DBT_EXECUTABLE

    monkeypatch.setenv("MEMKFAC_HOME", str(tmp_path))
    edited = "tiny-llama__kfac-r0.9"

    def write_auc(variant: str, probe_set: str, auc: float | None) -> None:
        rows = [
            {"score": s, "member_kind": "memorized", "nonmember_kind": "control"}
            | {"n_members": 8, "n_nonmembers": 4, "auc": auc, "tpr_at_1pct_fpr": 0.25}
            for s in SCORE_ORIENTATION
            if auc is not None
        ]
        table = make_table("mia_auc", rows, variant=variant, probe_set=probe_set, run_id="r1")
        write_table("mia_auc", table, tmp_path, variant, probe_set)

    write_auc(BASE, "canaries", 0.875)
    write_auc(edited, "canaries", 0.5)
    write_auc(edited, "pii", 0.625)  # the unedited model has no AUC file on pii
    write_auc("tiny-llama__svd-drop25", "canaries", None)  # a file with no rows

    def build() -> None:
        dbt = DbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE)
        dbt.cli(["build", "--select", "mia_auc_by_variant"], target_path=tmp_path / "target").wait()

    build()
    with duckdb.connect(str(tmp_path / "reports.duckdb"), read_only=True) as con:
        rows = con.execute(
            "select variant, probe_set, count(*), min(auc), min(base_auc), min(auc_drop), count(base_auc) "
            "from main_reports.mia_auc_by_variant group by all order by all"
        ).fetchall()
    n = len(SCORE_ORIENTATION)
    assert rows == [
        (BASE, "canaries", n, 0.875, 0.875, 0.0, n),
        (edited, "canaries", n, 0.5, 0.875, 0.375, n),
        (edited, "pii", n, 0.625, None, None, 0),
    ]
    write_auc(edited, "pii", 1.5)
    with pytest.raises(DagsterDbtCliRuntimeError):
        build()
    results = json.loads((tmp_path / "target" / "run_results.json").read_text())["results"]
    failed = {r["unique_id"].split(".")[2] for r in results if r["status"] not in ("pass", "success")}
    assert failed == {"in_range_mia_auc_by_variant_auc__1__0"}
