"""Schedules, RUNNING on a fresh instance: the weekly attack suite on every tested variant.

The schedule is the suite's only clock (the resurgence asset's automation condition has no cron
clause): each tick requests one run per tested variant, tagged with a seed of its own, the tick's
Unix time, so every week measures another draw of the batch order and the history carries the
spread. A run without the tag (the asset rebuilt because its inputs changed, or the main job) uses
the configured ``resurgence.seed``.
"""

import datetime as dt

import dagster as dg

from assets.partitions import Partitions
from assets.resurgence import SEED_TAG
from resources.config import PipelineConfig

RESURGENCE_JOB = "resurgence_job"


def build_resurgence_job(parts: Partitions):
    return dg.define_asset_job(
        RESURGENCE_JOB,
        selection=dg.AssetSelection.assets("resurgence"),
        partitions_def=parts.resurgence_variant,
        description="The attack suite on each tested variant (and its base): does recall return?",
    )


def tick_seed(tick: dt.datetime) -> int:
    """The seed of the runs of one tick: its Unix time in seconds (a new one each tick, the same
    when a tick is evaluated again)."""
    return int(tick.timestamp())


def build_weekly_resurgence(config: PipelineConfig, job) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="weekly_resurgence",
        cron_schedule=config.resurgence.cron,
        job=job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every week: the attack suite on each tested variant with a new seed, whether or not "
        "anything changed.",
    )
    def weekly_resurgence(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time
        stamp, seed = tick.strftime("%Y%m%d"), tick_seed(tick)
        for variant in config.resurgence_variants:
            yield dg.RunRequest(
                run_key=f"{variant}-{stamp}", partition_key=variant, tags={SEED_TAG: str(seed)}
            )

    return weekly_resurgence
