"""Edited models, one per variant (model x edit), their checks, and their MLflow registration.

Every edit of one base model is a version of one registered model, ``memkfac-<model>``
(``memkfac.registry``). The unedited base is not registered: it is the user's own input, already
named by every version's ``memkfac.base_fingerprint`` tag, and a fine-tune of it is no edit to watch.

The ``<model>__base`` variant is the unedited subject model: it is not copied, its "edited model" is
a record pointing at the subject model, so that every evaluation has the same inputs for all variants.
"""

from dataclasses import asdict
from pathlib import Path

import dagster as dg

from assets.automation import BUILD, DATA_EAGER
from assets.models import subject_model_dir
from assets.partitions import CANARY_PROBE_SET, Partitions
from memkfac.fingerprint import dir_bytes, model_fingerprint, sha256_file
from memkfac.registry import lineage_tags, registered_name, version_uri
from resources.config import PipelineConfig, split_variant
from resources.mlflow_registry import MlflowRegistry
from resources.store import ArtifactStore

GROUP = "edits"
CHECK_PROBES = 8  # canaries (prefix + suffix) run through an edited model by its check


def variant_model_dir(config: PipelineConfig, store: ArtifactStore, variant: str) -> Path:
    """The model directory of a variant: the subject model for ``__base``, else the edit's output."""
    model, _ = split_variant(variant)
    return (
        subject_model_dir(config, store, model)
        if config.edit_of(variant) is None
        else store.edit_dir(variant)
    )


def _canaries(store: ArtifactStore):
    from memkfac.probes import load_probe_set

    return load_probe_set(store.validated_probes(CANARY_PROBE_SET))


def build(config: PipelineConfig, parts: Partitions) -> list:
    @dg.asset(
        partitions_def=parts.variant,
        deps=[
            dg.AssetDep("subject_model", partition_mapping=parts.model_to_variants),
            dg.AssetDep("kfac_eigenbasis", partition_mapping=parts.model_to_variants),
            dg.AssetDep("corpus", partition_mapping=parts.model_to_variants),
            dg.AssetDep("probe_sets", partition_mapping=parts.to_canaries),  # forget sets, the check's batch
        ],
        group_name=GROUP,
        kinds={"pytorch", "safetensors"},
        code_version="edit-v1",
        automation_condition=BUILD,
        pool="compute",
        description="The variant's model: a K-FAC edit (or a control: per-side, SVD, random basis; a "
        "forget-set baseline: BalancedSubnet, GA+GD, NPO; a label-free one: identity basis, block deletion, "
        "noise) written as a Hugging Face checkpoint with memkfac_manifest.json.",
    )
    def edited_model(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        variant = context.partition_key
        model, _ = split_variant(variant)
        args = config.edit_of(variant)
        run_on = config.compute.of("edits").start()
        if args is None:
            path = variant_model_dir(config, store, variant)
            fingerprint = model_fingerprint(path)
            return dg.MaterializeResult(
                metadata={
                    "path": dg.MetadataValue.path(str(path)),
                    "method": "none",
                    "fingerprint": fingerprint,
                },
                data_version=dg.DataVersion(fingerprint),
            )
        from memkfac.corpora import load_split
        from memkfac.methods import EditInputs, apply_edit, mean_fraction_kept

        inputs = EditInputs(
            model_dir=subject_model_dir(config, store, model),
            eigen_dir=store.eigen_dir(model),
            probes=_canaries(store),
            retain=load_split(store.corpus_dir(model), "finetune"),
        )
        manifest = apply_edit(
            args, inputs, store.edit_dir(variant), progress=False, overwrite=True, device=run_on.device
        )
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(store.edit_dir(variant))),
                "method": args.method,
                "arguments": dg.MetadataValue.json(asdict(args)),
                "modules_edited": len(manifest.get("modules", [])),
                "mean_fraction_of_components_kept": mean_fraction_kept(manifest),
                "bytes": dir_bytes(store.edit_dir(variant)),
                "manifest": dg.MetadataValue.json(manifest),
            },
            data_version=dg.DataVersion(manifest["model_fingerprint"]),
        )

    @dg.asset_check(
        asset=edited_model,
        partitions_def=parts.variant,
        blocking=True,
        description=f"Loads, finite logits on a batch of {CHECK_PROBES} canaries (prefix + suffix), and "
        "the manifest names the current inputs (subject model, weights, factors, the edit's arguments).",
    )
    def edited_model_valid(
        context: dg.AssetCheckExecutionContext, store: ArtifactStore
    ) -> dg.AssetCheckResult:
        from memkfac.methods import check_edited_model

        variant = context.partition_key
        model, _ = split_variant(variant)
        found = check_edited_model(
            variant_model_dir(config, store, variant),
            _canaries(store)[:CHECK_PROBES],
            args=config.edit_of(variant),
            subject_dir=subject_model_dir(config, store, model),
            factor_index=store.factor_dir(model) / "index.json",
            device=config.compute.of("edits").start().device,
        )
        problems = found.pop("problems")
        return dg.AssetCheckResult(
            passed=not problems, metadata={**found, "problems": dg.MetadataValue.json(problems)}
        )

    @dg.asset(
        partitions_def=parts.edit_variant,
        deps=[dg.AssetDep(edited_model, partition_mapping=parts.variant_to_edit)],
        group_name=GROUP,
        kinds={"mlflow"},
        code_version="register-v2",
        automation_condition=DATA_EAGER,
        description="The edit as an MLflow run (params, metrics, manifest) and a new version (transformers "
        "flavor) of the registered model memkfac-<model>, tagged with its lineage (base fingerprint, factor "
        "index sha256, edit config, probe-set sha256, variant), with alias 'candidate'.",
    )
    def registered_model(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.checkpoint import MANIFEST_NAME, load_manifest
        from memkfac.methods import mean_fraction_kept

        variant = context.partition_key
        model, edit = split_variant(variant)
        path = store.edit_dir(variant)
        arguments = asdict(config.edit_of(variant))
        params = {"variant": variant} | {
            k: ",".join(map(str, v)) if isinstance(v, list | tuple) else v for k, v in arguments.items()
        }
        manifest = load_manifest(path)
        kept = mean_fraction_kept(manifest)
        metrics = {} if kept is None else {"mean_fraction_of_components_kept": kept}
        artifacts = {"manifest": path / MANIFEST_NAME}
        tags = {"dagster_run_id": context.run.run_id, "variant": variant, "kind": "edit"}
        run_id = mlflow.log_run(f"edit {variant}", params, metrics, tags, artifacts, model_dir=path)
        name = registered_name(model)
        probes = store.validated_probes(CANARY_PROBE_SET)
        lineage = lineage_tags(
            model=model,
            variant=variant,
            edit=edit,
            base_fingerprint=manifest["base_model"]["fingerprint"],
            factor_index_sha256=(manifest.get("eigenbasis") or {}).get("factor_index_sha256"),
            edit_config=arguments,
            probe_set=CANARY_PROBE_SET,
            probe_fingerprint=sha256_file(probes),
        )
        version = mlflow.register(name, run_id, tags=lineage)
        return dg.MaterializeResult(
            metadata={
                "mlflow_run_id": run_id,
                "registered_model": name,
                "version": version,
                "uri": version_uri(name, version),
                "lineage": dg.MetadataValue.json(lineage),
            }
        )

    return [edited_model, edited_model_valid, registered_model]
