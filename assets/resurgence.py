"""The resurgence test: fine-tune each tested variant N steps and measure whether recall comes back.

Runs weekly (schedule ``weekly_resurgence`` and the cron clause of its automation condition) and
whenever a tested variant is rematerialized. Protocol: ``memkfac.resurgence``.
"""

import dagster as dg

from assets.automation import weekly
from assets.edits import variant_model_dir
from assets.metadata import image_markdown, table_metadata
from assets.partitions import CANARY_PROBE_SET, Partitions
from resources.config import BASE_EDIT, PipelineConfig, split_variant, variant_key
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "resurgence"


def build(config: PipelineConfig, parts: Partitions) -> list:
    section, args = config.resurgence, config.resurgence.arguments

    @dg.asset(
        partitions_def=parts.resurgence_variant,
        deps=[
            dg.AssetDep("edited_model", partition_mapping=parts.variant_to_resurgence),
            dg.AssetDep("probe_sets", partition_mapping=parts.to_canaries),
        ],
        group_name=GROUP,
        kinds={"pytorch", "parquet", "mlflow"},
        code_version="resurgence-v1",
        automation_condition=weekly(section.cron),
        pool="compute",
        description=f"Fine-tune N in {list(args.steps)} steps on general text and on the sweep half of the "
        "trained canaries; strict recall on the holdout half and on control canaries, relative to the "
        "unedited model.",
    )
    def resurgence(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.corpora import load_split
        from memkfac.probes import load_probe_set
        from memkfac.resurgence import run_resurgence

        variant = context.partition_key
        model, _ = split_variant(variant)
        run_on = config.compute.of("resurgence").start()
        plot = store.root / "plots" / f"resurgence-{variant}.png"
        table = run_resurgence(
            variant_model_dir(config, store, variant),
            variant_model_dir(config, store, variant_key(model, BASE_EDIT)),
            load_probe_set(store.validated_probes(CANARY_PROBE_SET)),
            load_split(store.corpus_dir(model), "finetune"),
            args,
            variant=variant,
            probe_set=CANARY_PROBE_SET,
            plot_path=plot,
            root=store.root,
            progress=False,
            device=run_on.device,
        )
        rows = table.to_pylist()
        path = store.eval_table("resurgence", variant, CANARY_PROBE_SET)
        run_id = mlflow.log_run(
            f"resurgence {variant}",
            params={
                "variant": variant,
                "steps": list(args.steps),
                "lr": args.lr,
                "batch_size": args.batch_size,
            },
            metrics={f"{x['recipe']}.{x['kind']}.strict_pct.step{x['steps']}": x["strict_pct"] for x in rows},
            tags={"dagster_run_id": context.run.run_id, "variant": variant, "kind": "resurgence"},
            artifacts={"tables": path},
        )
        last = max(args.steps)
        key_figures = {
            f"resurgence/{x['recipe']}/{x['kind']}@{last}": x["resurgence"]
            for x in rows
            if x["steps"] == last and x["resurgence"] is not None
        }
        return dg.MaterializeResult(
            metadata={
                **table_metadata(table, path),
                **key_figures,
                "curves": image_markdown(plot, f"resurgence of {variant}"),
                "mlflow_run_id": run_id,
            }
        )

    return [resurgence]
