"""Evaluations: memorization and MIA per (variant, probe set), utility per variant, their table checks.

Every table is written by ``memkfac.tables.write_table`` into the hive layout dbt reads
(``evals/<table>/variant=<v>/probe_set=<p>/part.parquet``).
"""

import dagster as dg

from assets.automation import BUILD
from assets.edits import variant_model_dir
from assets.metadata import table_metadata
from assets.partitions import Partitions
from resources.config import BASE_EDIT, PipelineConfig, split_variant, variant_key
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "evaluation"
SUMMARY_COLUMNS = ["kind", "split", "n_probes", "strict_pct", "loose_pct", "avg_lev"]  # shown in the UI
HELDOUT = "heldout"  # the probe_set key of tables measured on held-out general text


def _variant_and_probe_set(context) -> tuple[str, str]:
    key = context.partition_key.keys_by_dimension
    return key["variant"], key["probe_set"]


def _read(store: ArtifactStore, table: str, variant: str, probe_set: str):
    import pyarrow.parquet as pq

    return pq.read_table(store.eval_table(table, variant, probe_set))


def table_check(table: str, expected_rows) -> callable:
    """Check body: the Parquet partition has ``table``'s exact schema and ``expected_rows(...)`` rows."""

    def check(context, store: ArtifactStore) -> dg.AssetCheckResult:
        from memkfac.errors import MemkfacError
        from memkfac.tables import validate_table

        keys = (
            _variant_and_probe_set(context)
            if isinstance(context.partition_key, dg.MultiPartitionKey)
            else (context.partition_key, HELDOUT)
        )
        data = _read(store, table, *keys)
        problems = []
        try:
            validate_table(table, data)
        except MemkfacError as e:
            problems.append(e.problem)
        want = expected_rows(store, *keys)
        if want is not None and data.num_rows != want:
            problems.append(f"{data.num_rows} rows, expected {want}")
        if data.num_rows == 0:
            problems.append("no rows")
        return dg.AssetCheckResult(
            passed=not problems, metadata={"rows": data.num_rows, "problems": dg.MetadataValue.json(problems)}
        )

    return check


def _probe_count(store: ArtifactStore, variant: str, probe_set: str) -> int:
    from memkfac.probes import load_probe_set

    return len(load_probe_set(store.validated_probes(probe_set)))


def build(config: PipelineConfig, parts: Partitions) -> list:
    eval_args = config.evaluation.arguments
    tables = ["memorization", "memorization_summary"]
    tables += ["mia", "mia_auc"] if eval_args.mia else []
    tables += ["positional_stress"] if eval_args.stress else []

    @dg.asset(
        partitions_def=parts.variant_x_probe_set,
        deps=[dg.AssetDep("edited_model"), dg.AssetDep("probe_sets")],
        group_name=GROUP,
        kinds={"parquet"},
        code_version="memorization-v3",
        automation_condition=BUILD,
        pool="compute",
        description="memkfac.evaluate.evaluate_model on the probe set (what `memkfac eval` runs): greedy "
        "continuation of |suffix| tokens from every prefix, scored strict, loose, Levenshtein and VerbMem "
        "(ROUGE-L F1), with exact memorization and extraction strength from one teacher-forced pass, per "
        "probe and per kind/split; membership-inference scores per probe (loss, zlib, Min-K%, Min-K%++) "
        "and their AUC and TPR at 1% FPR trained vs control; the positional stress test if "
        "evaluation.stress. Tables: " + ", ".join(tables) + ".",
    )
    def memorization_eval(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.evaluate import evaluate_model, write_tables
        from memkfac.memorization import FIELD_METRICS, stress_summary
        from memkfac.models import load_model
        from memkfac.probes import load_probe_set

        variant, probe_set = _variant_and_probe_set(context)
        run_on = config.compute.of("memorization_eval").start()
        model, tokenizer = load_model(
            variant_model_dir(config, store, variant), dtype=run_on.dtype, device=run_on.device
        )
        probes = load_probe_set(store.validated_probes(probe_set))
        result = evaluate_model(
            model, tokenizer, probes, variant=variant, probe_set=probe_set, args=eval_args, progress=False
        )
        paths = write_tables(result, store.root)
        rows = result["memorization_summary"].to_pylist()
        figures = {f"strict_pct/{r['kind']}/{r['split']}": r["strict_pct"] for r in rows}
        figures |= {f"loose_pct/{r['kind']}/{r['split']}": r["loose_pct"] for r in rows}
        figures |= {f"{m}/{r['kind']}/{r['split']}": r[m] for r in rows for m in FIELD_METRICS}
        if "mia_auc" in result:  # no rows without control probes
            auc = result["mia_auc"].to_pylist()
            figures |= {f"mia_auc/{r['score']}": r["auc"] for r in auc}
            figures |= {f"mia_tpr_at_1pct_fpr/{r['score']}": r["tpr_at_1pct_fpr"] for r in auc}
        if "positional_stress" in result:
            stress = stress_summary(result["positional_stress"].to_pylist())
            figures |= {f"stress/{k}": v for k, v in stress.items()}
        run_id = mlflow.log_run(
            f"memorization {variant} on {probe_set}",
            params={"variant": variant, "probe_set": probe_set, "probes": len(probes)},
            metrics=figures,
            tags={"dagster_run_id": context.run.run_id, "variant": variant, "kind": "evaluation"},
            artifacts={f"tables/{name}": path for name, path in paths.items()},
        )
        metadata = table_metadata(result["memorization"], paths["memorization"])
        for name in ("mia", "positional_stress"):
            if name in result:
                metadata |= table_metadata(result[name], paths[name], prefix=name)
        return dg.MaterializeResult(
            metadata={
                **metadata,
                **figures,
                "mlflow_run_id": run_id,
                "summary": dg.MetadataValue.md(_markdown(rows, [*SUMMARY_COLUMNS, *FIELD_METRICS])),
            }
        )

    checks = [
        dg.asset_check(
            asset=memorization_eval,
            name=f"{table}_table_valid",
            partitions_def=parts.variant_x_probe_set,
            blocking=True,
            description=f"Schema of the {table} table, one row per probe.",
        )(table_check(table, _probe_count))
        for table in ("memorization", "mia", "positional_stress")
        if table in tables
    ]

    @dg.asset(
        partitions_def=parts.variant,
        deps=[dg.AssetDep("edited_model"), dg.AssetDep("corpus", partition_mapping=parts.model_to_variants)],
        group_name=GROUP,
        kinds={"parquet"},
        code_version="utility-v1",
        automation_condition=BUILD,
        pool="compute",
        description="Held-out perplexity (table perplexity) and nDCG@10 of next-token top-10 lists against "
        "the unedited subject model (table ndcg).",
    )
    def utility_eval(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.evaluate import HeldOut, evaluate_utility

        variant = context.partition_key
        model, _ = split_variant(variant)
        run_on = config.compute.of("utility_eval").start()
        reference = variant_key(model, BASE_EDIT)
        heldout = HeldOut.from_corpus(store.corpus_dir(model), eval_args.heldout_blocks, name=HELDOUT)
        tables = evaluate_utility(
            variant_model_dir(config, store, variant),
            variant_model_dir(config, store, reference),
            heldout,
            eval_args,
            variant=variant,
            reference_name=reference,
            root=store.root,
            progress=False,
            device=run_on.device,
            dtype=run_on.dtype,
        )
        ppl, scores = tables["perplexity"].to_pylist()[0], tables["ndcg"].to_pylist()[0]
        path = store.eval_table("perplexity", variant, HELDOUT)
        mlflow_run = mlflow.log_run(
            f"utility {variant}",
            params={"variant": variant, "heldout_blocks": len(heldout.blocks), "reference": reference},
            metrics={"perplexity": ppl["perplexity"], "mean_nll": ppl["mean_nll"], "ndcg": scores["ndcg"]},
            tags={"dagster_run_id": context.run.run_id, "variant": variant, "kind": "evaluation"},
            artifacts={"tables": path},
        )
        return dg.MaterializeResult(
            metadata={
                **table_metadata(tables["perplexity"], path),
                "mlflow_run_id": mlflow_run,
                "perplexity": ppl["perplexity"],
                "mean_nll": ppl["mean_nll"],
                "ndcg": scores["ndcg"],
                "heldout_tokens": ppl["n_tokens"],
            }
        )

    utility_check = dg.asset_check(
        asset=utility_eval,
        name="perplexity_table_valid",
        partitions_def=parts.variant,
        blocking=True,
        description="Schema of the perplexity table, one row.",
    )(table_check("perplexity", lambda *_: 1))

    return [memorization_eval, *checks, utility_eval, utility_check]


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r[c]) for c in columns) + " |\n" for r in rows)
