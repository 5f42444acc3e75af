"""`memkfac compare` reports in the Dagster UI.

A comparison runs outside the graph: on demand, for hours on a CPU. It writes its Markdown report, the
rows as ``.json`` and the recall-against-perplexity figure as ``.png`` beside it, by default under
``MEMKFAC_HOME/reports``. The ``comparison_report`` asset stands for those reports: the
``comparison_reports`` sensor (jobs/sensors.py) records each new or changed one as a runless
materialization whose metadata shows the figure, the tables and the number of rows.
"""

import contextlib
import json
from pathlib import Path

import dagster as dg

from assets.metadata import image_markdown
from assets.partitions import Partitions
from memkfac.compare import REPORT_HEADER, is_report
from resources.config import PipelineConfig

COMPARISON_ASSET = "comparison_report"

comparison_report = dg.AssetSpec(
    COMPARISON_ASSET,
    group_name="reports",
    kinds={"markdown"},
    code_version="comparison-report-v1",
    description="The reports of `memkfac compare` under MEMKFAC_HOME/reports: every method's recall "
    "against perplexity (figure), the comparison and relearning tables. Recorded by the "
    "comparison_reports sensor; run the command to add one.",
)


def report_files(reports_dir: Path) -> dict[Path, list[Path]]:
    """``{report: its files}`` of every comparison report in ``reports_dir`` (a user's Markdown file is
    not one): the ``.md``, and its rows (``.json``) and figure (``.png``) where they exist."""
    return {
        report: [p for p in (report, report.with_suffix(".json"), report.with_suffix(".png")) if p.is_file()]
        for report in sorted(reports_dir.glob("*.md"))
        if is_report(report)
    }


def report_materialization(report: Path) -> dg.AssetMaterialization:
    """The report as a materialization of ``comparison_report``: path, tables, row count, figure."""
    metadata: dict = {
        "path": dg.MetadataValue.path(str(report)),
        "report": dg.MetadataValue.md(report.read_text(encoding="utf-8").removeprefix(REPORT_HEADER)),
    }
    with contextlib.suppress(OSError, ValueError):
        metadata["dagster/row_count"] = len(json.loads(report.with_suffix(".json").read_text()))
    figure = report.with_suffix(".png")
    if figure.is_file():
        metadata["recall_vs_perplexity"] = image_markdown(figure, "recall against perplexity, every method")
    return dg.AssetMaterialization(asset_key=COMPARISON_ASSET, description=report.name, metadata=metadata)


def build(config: PipelineConfig, parts: Partitions) -> list:
    return [comparison_report]
