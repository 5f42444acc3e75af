"""The single Dagster code location of memkfac (``dagster dev -w workspace.yaml``).

Settings come from the environment (resources/settings.py), the graph from the pipeline YAML
(``MEMKFAC_CONFIG``, default configs/default.yaml). ``build_definitions`` is what tests call with a
tiny config.
"""

from __future__ import annotations

import os

import dagster as dg

from assets import build_assets, reports
from assets.partitions import Partitions
from jobs.schedules import build_resurgence_job, build_weekly_resurgence
from jobs.sensors import (
    build_automation_sensor,
    build_comparison_sensor,
    build_input_files_sensor,
    build_registry_watch_sensor,
)
from resources.config import PipelineConfig, load_config
from resources.settings import Settings, build_resources


def build_definitions(config: PipelineConfig, settings: Settings) -> dg.Definitions:
    # dbt and the Pipes subprocess read the data root from the environment: make it the resolved one.
    os.environ["MEMKFAC_HOME"] = str(settings.home)
    parts = Partitions.from_config(config)
    resurgence_job = build_resurgence_job(parts)
    return dg.Definitions(
        assets=[*build_assets(config, parts), *reports.build()],
        jobs=[resurgence_job],
        schedules=[build_weekly_resurgence(config, resurgence_job)],
        sensors=[
            build_automation_sensor(),
            build_input_files_sensor(config, parts),
            build_registry_watch_sensor(config),
            build_comparison_sensor(),
        ],
        resources=build_resources(settings, config),
    )


SETTINGS = Settings.from_env()
CONFIG = load_config(SETTINGS.config_path)
defs = build_definitions(CONFIG, SETTINGS)
