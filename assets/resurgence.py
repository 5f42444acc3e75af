"""The resurgence test: fine-tune each tested variant N steps and measure whether recall comes back.

Runs weekly (schedule ``weekly_resurgence`` and the cron clause of its automation condition) and
whenever a tested variant is rematerialized. Protocol: ``memkfac.resurgence``.
"""

import dagster as dg

from assets.automation import weekly
from assets.edits import variant_model_dir
from assets.evaluation import eval_arguments
from assets.metadata import plot_markdown, table_metadata
from assets.models import CANARY_PROBE_SET
from assets.partitions import Partitions
from resources.config import BASE_EDIT, PipelineConfig, split_variant, variant_key
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "resurgence"


def build(config: PipelineConfig, parts: Partitions) -> list:
    r = config.resurgence

    @dg.asset(
        partitions_def=parts.resurgence_variant,
        deps=[
            dg.AssetDep("edited_model", partition_mapping=parts.variant_to_resurgence),
            dg.AssetDep("canaries"),
        ],
        group_name=GROUP,
        kinds={"pytorch", "parquet", "mlflow"},
        code_version="resurgence-v1",
        automation_condition=weekly(r.cron),
        pool="compute",
        description=f"Fine-tune N in {list(r.steps)} steps on general text and on the sweep half of the "
        "trained canaries; strict recall on the holdout half and on control canaries, relative to the "
        "unedited model.",
    )
    def resurgence(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.corpora import load_split
        from memkfac.probes import load_probe_set
        from memkfac.resurgence import RECIPES, ResurgenceArguments, resurgence_rows
        from memkfac.tables import make_table, new_run_id, write_table

        variant = context.partition_key
        model_name, _ = split_variant(variant)
        probes = load_probe_set(store.probe_file(CANARY_PROBE_SET))
        args = ResurgenceArguments(
            steps=r.steps,
            recipes=tuple(x for x in RECIPES if x in r.recipes),
            lr=r.lr,
            batch_size=r.batch_size,
            general_len=r.general_len,
            train_layers=r.train_layers,
            seed=r.seed,
            eval_batch_size=eval_arguments(config).batch_size,  # decoded as memorization_eval does
        )
        general = load_split(store.corpus_dir(model_name), "finetune")
        rows = resurgence_rows(
            variant_model_dir(config, store, variant),
            variant_model_dir(config, store, variant_key(model_name, BASE_EDIT)),
            probes,
            general,
            args,
            progress=False,
        )
        table = make_table(
            "resurgence", rows, variant=variant, probe_set=CANARY_PROBE_SET, run_id=new_run_id()
        )
        path = write_table("resurgence", table, store.root)

        def draw(ax):
            for recipe in args.recipes:
                for kind, style in (("memorized", "-o"), ("control", ":x")):
                    pts = sorted(
                        (x["steps"], x["strict_pct"])
                        for x in rows
                        if x["recipe"] == recipe and x["kind"] == kind
                    )
                    if pts:
                        ax.plot(
                            [max(s, 1) for s, _ in pts], [p for _, p in pts], style, label=f"{recipe}/{kind}"
                        )
            ax.set_xscale("log")
            ax.set_xlabel("fine-tuning steps (0 plotted at 1)")
            ax.set_ylabel("strict recall %")
            ax.legend(fontsize=7)

        plot = plot_markdown(draw, f"resurgence of {variant}")
        metrics = {f"{x['recipe']}.{x['kind']}.strict_pct.step{x['steps']}": x["strict_pct"] for x in rows}
        run_id = mlflow.log_run(
            f"resurgence {variant}",
            params={
                "variant": variant,
                "steps": list(args.steps),
                "lr": args.lr,
                "batch_size": args.batch_size,
            },
            metrics=metrics,
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
            metadata={**table_metadata(table, path), **key_figures, "curves": plot, "mlflow_run_id": run_id}
        )

    return [resurgence]
