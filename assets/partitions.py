"""Partitions of the asset graph, derived from the pipeline config.

| definition | keys | used by |
|---|---|---|
| ``model`` (static) | configured model names | base model, corpus, injection, factors, eigenbasis |
| ``variant`` (static) | ``<model>__<edit>``, ``<model>__base`` | edited models, utility |
| ``edit_variant`` (static) | the variants that edit (no ``__base``) | MLflow registration |
| ``resurgence_variant`` (static) | the variants given the resurgence test | resurgence |
| ``probe_set`` (dynamic) | probe-set files found by the sensor | probe sets (``canaries`` feeds all) |
| ``variant x probe_set`` (multi) | every evaluation cell | memorization evaluations |

Multi-partitions have at most two dimensions, so model and edit share one key (``__`` separated).
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from resources.config import PipelineConfig

PROBE_SET_PARTITIONS = dg.DynamicPartitionsDefinition(name="probe_set")
CANARY_PROBE_SET = "canaries"  # the canaries asset writes its probe set as probes/canaries.jsonl


@dataclass(frozen=True)
class Partitions:
    model: dg.StaticPartitionsDefinition
    variant: dg.StaticPartitionsDefinition
    edit_variant: dg.StaticPartitionsDefinition
    resurgence_variant: dg.StaticPartitionsDefinition
    probe_set: dg.DynamicPartitionsDefinition
    variant_x_probe_set: dg.MultiPartitionsDefinition
    model_to_variants: dg.StaticPartitionMapping  # model key -> its variant keys
    variant_to_edit: dg.StaticPartitionMapping  # variant key -> itself, for edit variants
    variant_to_resurgence: dg.StaticPartitionMapping  # variant key -> itself, where it is tested
    to_canaries: dg.SpecificPartitionsPartitionMapping  # any key -> the canary probe set

    @classmethod
    def from_config(cls, config: PipelineConfig) -> Partitions:
        variant = dg.StaticPartitionsDefinition(config.variants)
        by_model = {m: config.variants_of(m) for m in config.models}
        edit_variants = [v for v in config.variants if config.edit_of(v) is not None]
        return cls(
            model=dg.StaticPartitionsDefinition(list(config.models)),
            variant=variant,
            edit_variant=dg.StaticPartitionsDefinition(edit_variants),
            resurgence_variant=dg.StaticPartitionsDefinition(config.resurgence_variants),
            probe_set=PROBE_SET_PARTITIONS,
            variant_x_probe_set=dg.MultiPartitionsDefinition(
                {"variant": variant, "probe_set": PROBE_SET_PARTITIONS}
            ),
            model_to_variants=dg.StaticPartitionMapping(by_model),
            variant_to_edit=dg.StaticPartitionMapping({v: v for v in edit_variants}),
            variant_to_resurgence=dg.StaticPartitionMapping({v: v for v in config.resurgence_variants}),
            to_canaries=dg.SpecificPartitionsPartitionMapping([CANARY_PROBE_SET]),
        )
