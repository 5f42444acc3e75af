"""What the edits kept and why: downstream task retention, band activations, and the champion per model.

- ``downstream_base[model]`` runs the task suite on the unedited model (its per-item scores are the
  reference); ``downstream_eval[edit variant]`` runs it on an edit and writes retention with
  paired-bootstrap intervals (table downstream).
- ``band_analysis[model]``: mean |v^T x| per curvature-mass band on memorized canaries, control canaries,
  clean text and tasks, for the edited layers (table band_activation, plus the ratio plot).
- ``champions``: per model, the newest version of the edit with the lowest held-out recall within the
  perplexity budget gets the alias ``champion`` of ``memkfac-<model>`` (MLflow keeps an alias on one
  version per registered model, so the previous champion loses it); the recall-vs-perplexity plot of
  every variant shows the trade-off.
"""

import dagster as dg

from assets.automation import BUILD, REPORT
from assets.edits import variant_model_dir
from assets.metadata import image_markdown, table_metadata
from assets.models import subject_model_dir
from assets.partitions import CANARY_PROBE_SET, Partitions
from memkfac.registry import latest_version_of_variant, registered_name, set_champion
from resources.config import BASE_EDIT, PipelineConfig, split_variant, variant_key
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "analysis"


def build(config: PipelineConfig, parts: Partitions) -> list:
    assets = []
    if config.downstream is not None:
        assets += _downstream(config, parts)
    return assets + [_band_analysis(config, parts), *_champions(config, parts)]


def _downstream(config: PipelineConfig, parts: Partitions) -> list:
    @dg.asset(
        partitions_def=parts.model,
        deps=[dg.AssetDep("subject_model")],
        group_name=GROUP,
        kinds={"parquet"},
        code_version="downstream-v1",
        automation_condition=BUILD,
        pool="compute",
        description="The offline lm-eval task suite on the unedited model: the reference of retention.",
    )
    def downstream_base(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.downstream import evaluate_downstream

        model = context.partition_key
        table = evaluate_downstream(
            subject_model_dir(config, store, model),
            _downstream_arguments(config),
            variant_key(model, BASE_EDIT),
            root=store.root,
            progress=False,
        )
        return _downstream_result(table, store)

    @dg.asset(
        partitions_def=parts.edit_variant,
        deps=[
            dg.AssetDep("edited_model", partition_mapping=parts.variant_to_edit),
            dg.AssetDep(downstream_base, partition_mapping=_model_of(config, parts)),
        ],
        group_name=GROUP,
        kinds={"parquet"},
        code_version="downstream-v1",
        automation_condition=BUILD,
        pool="compute",
        description="The task suite on an edit: score, and retention = edited / unedited with "
        "paired-bootstrap 95% intervals per task.",
    )
    def downstream_eval(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.downstream import evaluate_downstream

        variant = context.partition_key
        model, _ = split_variant(variant)
        table = evaluate_downstream(
            variant_model_dir(config, store, variant),
            _downstream_arguments(config),
            variant,
            base_variant=variant_key(model, BASE_EDIT),
            root=store.root,
            progress=False,
        )
        return _downstream_result(table, store)

    return [downstream_base, downstream_eval]


def _downstream_arguments(config: PipelineConfig):
    """``downstream``'s arguments on the device and dtype ``compute`` gives the step, checked here first."""
    import dataclasses

    run_on = config.compute.of("downstream").start()
    return dataclasses.replace(config.downstream, device=run_on.device, dtype=run_on.dtype)


def _model_of(config: PipelineConfig, parts: Partitions) -> dg.StaticPartitionMapping:
    """model -> its edit variants."""
    edit_variants = set(parts.edit_variant.get_partition_keys())
    return dg.StaticPartitionMapping(
        {m: [v for v in config.variants_of(m) if v in edit_variants] for m in config.models}
    )


def _downstream_result(table, store: ArtifactStore) -> dg.MaterializeResult:
    rows = table.to_pylist()
    variant, suite = rows[0]["variant"], rows[0]["probe_set"]
    figures = {f"score/{r['task']}": r["score"] for r in rows}
    figures |= {f"retention/{r['task']}": r["retention"] for r in rows if r["retention"] is not None}
    return dg.MaterializeResult(
        metadata={**table_metadata(table, store.eval_table("downstream", variant, suite)), **figures}
    )


def _band_analysis(config: PipelineConfig, parts: Partitions):
    @dg.asset(
        partitions_def=parts.model,
        deps=[
            dg.AssetDep("subject_model"),
            dg.AssetDep("kfac_eigenbasis"),
            dg.AssetDep("probe_sets", partition_mapping=parts.to_canaries),
        ],
        group_name=GROUP,
        kinds={"parquet"},
        code_version="bands-v1",
        automation_condition=BUILD,
        pool="compute",
        description="Mean |v^T x| per curvature-mass band (top 10%, 10-25%, 25-50%, bottom 50%) of the "
        "edited layers (or bands.layers), on memorized vs control canaries, clean text and tasks, relative "
        "to clean text.",
    )
    def band_analysis(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from memkfac.bands import run_band_analysis
        from memkfac.corpora import load_split
        from memkfac.probes import load_probe_set

        model = context.partition_key
        run_on = config.compute.of("bands").start()
        variant = variant_key(model, BASE_EDIT)
        plot = store.root / "plots" / f"bands-{model}.png"
        table = run_band_analysis(
            subject_model_dir(config, store, model),
            store.eigen_dir(model),
            load_probe_set(store.validated_probes(CANARY_PROBE_SET)),
            load_split(store.corpus_dir(model), "heldout"),
            config.bands,
            edits=list(config.edits.values()),
            variant=variant,
            probe_set=CANARY_PROBE_SET,
            plot_path=plot,
            root=store.root,
            progress=False,
            overwrite=True,
            device=run_on.device,
            dtype=run_on.dtype,
        )
        rows = table.to_pylist()
        bottom = [r["ratio_to_clean"] for r in rows if r["band"] == "bottom50" and r["source"] == "memorized"]
        return dg.MaterializeResult(
            metadata={
                **table_metadata(table, store.eval_table("band_activation", variant, CANARY_PROBE_SET)),
                "layers": dg.MetadataValue.json(sorted({r["layer"] for r in rows})),
                "bottom50_memorized_over_clean": sum(bottom) / len(bottom) if bottom else None,
                "band_ratios": image_markdown(plot, "band ratios"),
            }
        )

    return band_analysis


def _champions(config: PipelineConfig, parts: Partitions) -> list:
    budget = config.evaluation.max_perplexity_increase

    @dg.asset(
        deps=[dg.AssetDep("memorization_eval"), dg.AssetDep("utility_eval"), dg.AssetDep("registered_model")],
        group_name=GROUP,
        kinds={"mlflow"},
        code_version="champions-v2",
        automation_condition=REPORT,
        description="Per model, the edit with the lowest strict recall on held-out canaries among those "
        f"within +{budget:.0%} perplexity becomes 'champion' of memkfac-<model> (on one version only); "
        "plots recall against perplexity for every variant.",
    )
    def champions(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        import dataclasses

        from memkfac.champion import choose_champion, evaluated, plot_recall_vs_perplexity

        current = _current_edits(context.instance, parts)
        recall, perplexity = evaluated(store.root, CANARY_PROBE_SET)
        chosen, plots = {}, {}
        for model in config.models:
            base = variant_key(model, BASE_EDIT)
            edits = {v: config.edit_of(v) for v in config.variants_of(model) if v in current}
            champion, points = choose_champion(base, edits, recall, perplexity, budget)
            if champion is not None:
                name, client = registered_name(model), mlflow.client()
                version = latest_version_of_variant(client, name, champion.variant)
                set_champion(client, name, version)
                chosen[model] = dataclasses.asdict(champion) | {"registered_model": name, "version": version}
            if points:
                plot = plot_recall_vs_perplexity(
                    points,
                    store.root / "plots" / f"recall-vs-perplexity-{model}.png",
                    model,
                    "perplexity increase %",
                )
                plots[f"recall_vs_perplexity/{model}"] = image_markdown(plot, f"{model}: every variant")
        return dg.MaterializeResult(
            metadata={
                "champions": dg.MetadataValue.json(chosen),
                "perplexity_budget": budget,
                "variants_without_a_current_edit": dg.MetadataValue.json(
                    sorted(set(parts.edit_variant.get_partition_keys()) - current)
                ),
                **plots,
            }
        )

    return [champions]


def _current_edits(instance: dg.DagsterInstance, parts: Partitions) -> set[str]:
    """The edit variants whose edited model and registration are materialized and whose latest
    attempt did not fail: a variant whose edit fails now keeps its older tables, but is no candidate."""
    variants = parts.edit_variant.get_partition_keys()
    statuses = [
        instance.get_status_by_partition(dg.AssetKey(key), variants, partitions_def) or {}
        for key, partitions_def in (("edited_model", parts.variant), ("registered_model", parts.edit_variant))
    ]
    return {v for v in variants if all(s.get(v) == dg.AssetPartitionStatus.MATERIALIZED for s in statuses)}
