"""Schedules, RUNNING on a fresh instance: the weekly resurgence test of every tested variant."""

import dagster as dg

from assets.partitions import Partitions
from resources.config import PipelineConfig

RESURGENCE_JOB = "resurgence_job"


def build_resurgence_job(parts: Partitions):
    return dg.define_asset_job(
        RESURGENCE_JOB,
        selection=dg.AssetSelection.assets("resurgence"),
        partitions_def=parts.resurgence_variant,
        description="Fine-tune each tested variant (and its base) N steps; measure whether recall returns.",
    )


def build_weekly_resurgence(config: PipelineConfig, job) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="weekly_resurgence",
        cron_schedule=config.resurgence.cron,
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every week: one resurgence run per tested variant, whether or not anything changed.",
    )
    def weekly_resurgence(context: dg.ScheduleEvaluationContext):
        stamp = context.scheduled_execution_time.strftime("%Y%m%d")
        for variant in config.resurgence_variants:
            yield dg.RunRequest(run_key=f"{variant}-{stamp}", partition_key=variant)

    return weekly_resurgence
