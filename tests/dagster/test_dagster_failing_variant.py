"""The pipeline under a failing variant, through the main job's command (``python -m jobs.main``).

On the tiny config, the SVD variant's edit names layers outside the 4-layer model, so it fails as a
user's typo would. The other variants are still edited, registered, evaluated and reported, the
champion is chosen among them, and the job exits 1 naming the failed step. The fast test shows the
rule behind it on a small graph: what reads a failed partition is skipped, a report over many
partitions runs on those that exist.
"""

import re
import subprocess
import sys

import dagster as dg
import pytest
import yaml

from tests.dagster.conftest import PROJECT, TINY_CONFIG, tiny_pipeline

BAD = "tiny-llama__svd-drop25"


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    """``python -m jobs.main`` from the project root on the tiny config with the SVD edit broken."""
    root = tmp_path_factory.mktemp("failing_variant")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["edits"]["svd-drop25"]["layers"] = "2-40"
    path = root / "tiny-bad-edit.yaml"
    path.write_text(yaml.safe_dump(config))
    with tiny_pipeline(root, MEMKFAC_CONFIG=str(path)) as p:
        job = subprocess.run(
            [sys.executable, "-m", "jobs.main"], cwd=PROJECT, capture_output=True, text=True, timeout=1200
        )
        p.update(status=job.returncode, stdout=job.stdout, stderr=job.stderr)
        yield p


def _good(config) -> list[str]:
    return sorted(v for v in config.variants if v != BAD)


@pytest.mark.slow
def test_exit_status_and_summary_name_the_failed_variant(failing):
    assert failing["status"] == 1, failing["stdout"] + failing["stderr"][-3000:]
    failed = re.search(r"FAILED after [\d.]+ min: (.*?)\. ", failing["stderr"])
    assert failed and failed.group(1) == f"edited_model[{BAD}]", failing["stderr"]
    skipped = [line for line in failing["stdout"].splitlines() if "skipped, an input failed" in line]
    assert skipped and all(BAD in line for line in skipped), skipped


@pytest.mark.slow
def test_other_variants_are_edited_registered_and_evaluated(failing):
    instance, config = failing["instance"], failing["config"]
    good = _good(config)
    for key in ("edited_model", "utility_eval"):
        assert sorted(instance.get_materialized_partitions(dg.AssetKey(key))) == good, key
    registered = instance.get_materialized_partitions(dg.AssetKey("registered_model"))
    assert sorted(registered) == [v for v in good if config.edit_of(v) is not None]
    cells = instance.get_materialized_partitions(dg.AssetKey("memorization_eval"))  # "probe_set|variant"
    assert sorted(c.split("|")[1] for c in cells) == good


@pytest.mark.slow
def test_reports_build_on_the_variants_that_exist(failing):
    import duckdb

    good = _good(failing["config"])
    with duckdb.connect(str(failing["store"].duckdb_path), read_only=True) as con:
        rows = con.execute(
            "select variant from main_reports.recall_vs_perplexity order by variant"
        ).fetchall()
    assert [r[0] for r in rows] == good
    table = failing["stdout"].split("recall_vs_perplexity):", 1)[1]
    assert all(v in table for v in good) and BAD not in table


@pytest.mark.slow
def test_champion_is_chosen_among_the_variants_that_exist(failing):
    instance = failing["instance"]
    event = instance.get_latest_materialization_event(dg.AssetKey("champions"))
    metadata = event.asset_materialization.metadata
    chosen = metadata["champions"].value
    assert chosen["tiny-llama"]["variant"] in _good(failing["config"])
    assert metadata["variants_without_a_current_edit"].value == [BAD]


def test_a_report_over_many_partitions_runs_on_those_that_exist(tmp_path):
    from assets.automation import BUILD, REPORT
    from jobs.main import run_pipeline
    from jobs.sensors import SENSOR_NAME

    variants = dg.StaticPartitionsDefinition(["good", "bad"])

    @dg.asset(partitions_def=variants, automation_condition=BUILD)
    def edited(context: dg.AssetExecutionContext) -> None:
        if context.partition_key == "bad":
            raise RuntimeError("the edit failed")

    @dg.asset(partitions_def=variants, deps=[edited], automation_condition=BUILD)
    def evaluated() -> None: ...

    @dg.asset(deps=[evaluated], automation_condition=REPORT)
    def report() -> None: ...

    @dg.sensor(name=SENSOR_NAME)
    def no_input_changes(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return dg.SensorResult()

    defs = dg.Definitions(assets=[edited, evaluated, report], sensors=[no_input_changes])
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    log: list[str] = []
    assert run_pipeline(defs, instance, "unused store", log=log.append) == ["edited[bad]"]
    assert "  evaluated[bad]: skipped, an input failed" in log
    assert instance.get_materialized_partitions(evaluated.key) == {"good"}
    assert instance.get_latest_materialization_event(report.key) is not None
