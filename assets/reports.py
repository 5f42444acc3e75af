"""The dbt report models (dbt-duckdb over the evaluation Parquet); dbt tests become asset checks.

dbt is the only process that writes ``reports.duckdb``: the dbt step runs in the ``duckdb_writer``
pool (one slot, see dagster.yaml.example).
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DagsterDbtTranslatorSettings, DbtCliResource, dbt_assets

from assets.automation import REPORT
from resources.dbt_project import dbt_project, ensure_manifest

GROUP = "reports"


class ReportTranslator(DagsterDbtTranslator):
    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str:
        return GROUP

    def get_automation_condition(self, dbt_resource_props: Mapping[str, Any]) -> dg.AutomationCondition:
        return REPORT


def build() -> list:
    ensure_manifest()

    @dbt_assets(
        manifest=dbt_project.manifest_path,
        project=dbt_project,
        dagster_dbt_translator=ReportTranslator(
            settings=DagsterDbtTranslatorSettings(enable_duplicate_source_asset_keys=True)
        ),
        pool="duckdb_writer",
    )
    def reports(context: dg.AssetExecutionContext, dbt: DbtCliResource):
        yield from dbt.cli(["build"], context=context).stream()

    return [reports]
