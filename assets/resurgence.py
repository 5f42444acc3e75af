"""The attack suite: fine-tune each tested variant N steps in each arm and measure whether recall
comes back (protocol: ``memkfac.resurgence``).

Rebuilt when a tested variant or the canaries change (``BUILD``, with the configured seed) and every
week by the ``weekly_resurgence`` schedule (jobs/schedules.py), whose runs carry a seed of their own
in the ``SEED_TAG`` run tag. Every run is appended to the ``resurgence`` table, never overwritten.
"""

import dataclasses

import dagster as dg

from assets.automation import BUILD
from assets.edits import variant_model_dir
from assets.metadata import image_markdown, table_metadata
from assets.partitions import CANARY_PROBE_SET, Partitions
from resources.config import BASE_EDIT, PipelineConfig, split_variant, variant_key
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "resurgence"
SEED_TAG = "memkfac/resurgence_seed"  # run tag: the seed of a scheduled run (absent: resurgence.seed)


def build(config: PipelineConfig, parts: Partitions) -> list:
    args = config.resurgence.arguments

    @dg.asset(
        partitions_def=parts.resurgence_variant,
        deps=[
            dg.AssetDep("edited_model", partition_mapping=parts.variant_to_resurgence),
            dg.AssetDep("probe_sets", partition_mapping=parts.to_canaries),
        ],
        group_name=GROUP,
        kinds={"pytorch", "parquet", "mlflow"},
        code_version="resurgence-v2",
        automation_condition=BUILD,
        pool="compute",
        description=f"The attack suite ({', '.join(args.arms)}): fine-tune N in {list(args.steps)} steps; "
        "strict recall on the held-back canaries and on control canaries, as the fraction of the "
        "unedited model's recall recovered. Every run appended to the resurgence table.",
    )
    def resurgence(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.corpora import load_split
        from memkfac.probes import load_probe_set
        from memkfac.resurgence import ResurgenceArguments, run_resurgence

        variant = context.partition_key
        model, _ = split_variant(variant)
        seed = int(context.run.tags.get(SEED_TAG, args.seed))
        run_args: ResurgenceArguments = dataclasses.replace(args, seed=seed)
        run_on = config.compute.of("resurgence").start()
        plot = store.root / "plots" / f"resurgence-{variant}.png"
        table, path = run_resurgence(
            variant_model_dir(config, store, variant),
            variant_model_dir(config, store, variant_key(model, BASE_EDIT)),
            load_probe_set(store.validated_probes(CANARY_PROBE_SET)),
            load_split(store.corpus_dir(model), "finetune"),
            run_args,
            variant=variant,
            probe_set=CANARY_PROBE_SET,
            plot_path=plot,
            root=store.root,
            progress=False,
            device=run_on.device,
        )
        rows = table.to_pylist()
        run_id = mlflow.log_run(
            f"resurgence {variant}",
            params={
                "variant": variant,
                "arms": list(args.arms),
                "steps": list(args.steps),
                "lr": args.lr,
                "batch_size": args.batch_size,
                "seed": seed,
            },
            metrics={
                f"{x['arm']}.{x['kind']}.{column}.step{x['steps']}": x[column]
                for x in rows
                for column in ("strict_pct", "recovered")
                if x[column] is not None
            },
            tags={"dagster_run_id": context.run.run_id, "variant": variant, "kind": "resurgence"},
            artifacts={"tables": path},
        )
        last = max(args.steps)
        key_figures = {
            f"recovered/{x['arm']}/{x['kind']}@{last}": x["recovered"]
            for x in rows
            if x["steps"] == last and x["recovered"] is not None
        }
        return dg.MaterializeResult(
            metadata={
                **table_metadata(table, path),
                **key_figures,
                "seed": seed,
                "curves": image_markdown(plot, f"attacks on {variant}"),
                "mlflow_run_id": run_id,
            }
        )

    return [resurgence]
