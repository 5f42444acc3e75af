"""The asset graph: thin Dagster wrappers over memkfac, built from one pipeline config.

Each module's ``build(config, partitions)`` returns its assets and asset checks. Group order follows
the data: sources -> models -> probes -> kfac -> edits -> evaluation -> analysis -> resurgence -> watch
-> reports (the comparison reports, and the dbt models).
"""

from __future__ import annotations

from assets import analysis, comparisons, edits, evaluation, kfac, models, probes, resurgence, sources, watch
from assets.partitions import Partitions
from resources.config import PipelineConfig

MODULES = (sources, models, probes, kfac, edits, evaluation, analysis, resurgence, watch, comparisons)


def build_assets(config: PipelineConfig, parts: Partitions) -> list:
    """Every asset, source asset and asset check of the graph (dbt reports come from assets.reports)."""
    return [d for module in MODULES for d in module.build(config, parts)]
