"""What the edits kept and why: downstream task retention, band activations, and the champion per model.

- ``downstream_base[model]`` runs the task suite on the unedited model (its per-item scores are the
  reference); ``downstream_eval[edit variant]`` runs it on an edit and writes retention with
  paired-bootstrap intervals (table downstream).
- ``band_analysis[model]``: mean |v^T x| per curvature-mass band on memorized canaries, control canaries,
  clean text and tasks, for the edited layers (table band_activation, plus the ratio plot).
- ``champions``: per model, the edit with the lowest held-out recall within the perplexity budget gets
  the MLflow alias ``champion``; the recall-vs-rho plot shows the trade-off.
"""

import base64

import dagster as dg

from assets.automation import BUILD, REPORT
from assets.edits import variant_model_dir
from assets.metadata import plot_markdown, table_metadata
from assets.models import CANARY_PROBE_SET, subject_model_dir
from assets.partitions import Partitions
from resources.config import BASE_EDIT, PipelineConfig, split_variant, variant_key
from resources.mlflow_registry import CHAMPION, MlflowRegistry
from resources.store import ArtifactStore

GROUP = "analysis"


def _downstream_args(config: PipelineConfig):
    from memkfac.downstream import DownstreamArguments

    settings = dict(config.downstream)
    if "tasks" in settings:
        settings["tasks"] = tuple(settings["tasks"])
    return DownstreamArguments(**settings)


def build(config: PipelineConfig, parts: Partitions) -> list:
    assets = []
    if config.downstream:
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
            _downstream_args(config),
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
            _downstream_args(config),
            variant,
            base_variant=variant_key(model, BASE_EDIT),
            root=store.root,
            progress=False,
        )
        return _downstream_result(table, store)

    return [downstream_base, downstream_eval]


def _model_of(config: PipelineConfig, parts: Partitions) -> dg.StaticPartitionMapping:
    """model -> its edit variants."""
    return dg.StaticPartitionMapping(
        {
            m: [v for v in parts.edit_variant.get_partition_keys() if split_variant(v)[0] == m]
            for m in config.models
        }
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
    settings = dict(config.bands)

    @dg.asset(
        partitions_def=parts.model,
        deps=[dg.AssetDep("subject_model"), dg.AssetDep("kfac_eigenbasis"), dg.AssetDep("canaries")],
        group_name=GROUP,
        kinds={"parquet"},
        code_version="bands-v1",
        automation_condition=BUILD,
        pool="compute",
        description="Mean |v^T x| per curvature-mass band (top 10%, 10-25%, 25-50%, bottom 50%) of the "
        "edited layers, on memorized vs control canaries, clean text and tasks, relative to clean text.",
    )
    def band_analysis(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        from transformers import AutoConfig

        from memkfac.bands import run_band_analysis
        from memkfac.corpora import load_split
        from memkfac.probes import load_probe_set
        from memkfac.targets import parse_layers

        model = context.partition_key
        subject = subject_model_dir(config, store, model)
        n_layers = AutoConfig.from_pretrained(subject).num_hidden_layers
        kfac_edits = [e for e in config.edits.values() if e.method == "kfac"] or list(config.edits.values())
        layers = sorted({i for e in kfac_edits for i in parse_layers(e.layers, n_layers)})
        plot = store.root / "plots" / f"bands-{model}.png"
        table = run_band_analysis(
            subject,
            store.eigen_dir(model),
            layers,
            load_probe_set(store.probe_file(CANARY_PROBE_SET)),
            load_split(store.corpus_dir(model), "heldout"),
            projections=kfac_edits[0].projections if kfac_edits else ("gate", "up"),
            variant=variant_key(model, BASE_EDIT),
            probe_set=CANARY_PROBE_SET,
            plot_path=plot,
            root=store.root,
            progress=False,
            overwrite=True,
            **settings,
        )
        rows = table.to_pylist()
        bottom = [r["ratio_to_clean"] for r in rows if r["band"] == "bottom50" and r["source"] == "memorized"]
        return dg.MaterializeResult(
            metadata={
                **table_metadata(
                    table,
                    store.eval_table("band_activation", variant_key(model, BASE_EDIT), CANARY_PROBE_SET),
                ),
                "layers": dg.MetadataValue.json(layers),
                "bottom50_memorized_over_clean": sum(bottom) / len(bottom) if bottom else None,
                "band_ratios": dg.MetadataValue.md(
                    f"![band ratios](data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()})"
                ),
            }
        )

    return band_analysis


def _champions(config: PipelineConfig, parts: Partitions) -> list:
    budget = float(config.evaluation.get("max_perplexity_increase", 0.10))

    @dg.asset(
        deps=[dg.AssetDep("memorization_eval"), dg.AssetDep("utility_eval"), dg.AssetDep("registered_model")],
        group_name=GROUP,
        kinds={"mlflow"},
        code_version="champions-v1",
        automation_condition=REPORT,
        description="Per model, the edit with the lowest strict recall on held-out canaries among those "
        f"within +{budget:.0%} perplexity becomes the MLflow 'champion'; plots recall and perplexity "
        "against rho.",
    )
    def champions(store: ArtifactStore, mlflow: MlflowRegistry) -> dg.MaterializeResult:
        from memkfac.tables import read_table

        recall = {
            r["variant"]: r["strict_pct"]
            for r in read_table("memorization_summary", store.root).to_pylist()
            if r["probe_set"] == CANARY_PROBE_SET and r["kind"] == "memorized" and r["split"] == "holdout"
        }
        ppl = {r["variant"]: r["perplexity"] for r in read_table("perplexity", store.root).to_pylist()}
        chosen, metadata = {}, {}
        for model in config.models:
            base = variant_key(model, BASE_EDIT)
            candidates = [
                v
                for v in config.variants_of(model)
                if v != base and v in recall and v in ppl and base in ppl and ppl[v] / ppl[base] - 1 <= budget
            ]
            if candidates:
                best = min(candidates, key=lambda v: (recall[v], ppl[v]))
                version = mlflow.client().get_model_version_by_alias(best, "candidate").version
                mlflow.set_alias(best, CHAMPION, version)
                chosen[model] = {
                    "variant": best,
                    "version": version,
                    "strict_pct": recall[best],
                    "perplexity_increase": ppl[best] / ppl[base] - 1,
                }
            kfac = sorted(
                (config.edit_of(v).keep_mass, recall[v], ppl[v] / ppl[base] - 1)
                for v in config.variants_of(model)
                if v != base
                and config.edit_of(v).method == "kfac"
                and v in recall
                and v in ppl
                and base in ppl
            )
            if kfac:
                metadata[f"recall_vs_rho/{model}"] = plot_markdown(
                    lambda ax, pts=kfac: _draw_tradeoff(ax, pts), f"{model}: K-FAC edits by rho"
                )
        return dg.MaterializeResult(
            metadata={"champions": dg.MetadataValue.json(chosen), "perplexity_budget": budget, **metadata}
        )

    return [champions]


def _draw_tradeoff(ax, points: list[tuple[float, float, float]]) -> None:
    rho = [p[0] for p in points]
    ax.plot(rho, [p[1] for p in points], "o-", color="tab:red", label="strict recall % (held-out canaries)")
    ax.set_xlabel("rho (curvature mass kept)")
    ax.set_ylabel("strict recall %")
    twin = ax.twinx()
    twin.plot(rho, [100 * p[2] for p in points], "s--", color="tab:blue", label="perplexity increase %")
    twin.set_ylabel("perplexity increase %")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="lower right", fontsize=7)
