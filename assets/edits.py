"""Edited models, one per variant (model x edit), their checks, and their MLflow registration.

The ``<model>__base`` variant is the unedited subject model: it is not copied, its "edited model" is
a record pointing at the subject model, so that every evaluation has the same inputs for all variants.
"""

from pathlib import Path

import dagster as dg

from assets.automation import BUILD, DATA_EAGER
from assets.metadata import dir_bytes
from assets.models import subject_model_dir
from assets.partitions import Partitions
from memkfac.fingerprint import model_fingerprint, sha256_file
from resources.config import PipelineConfig, split_variant
from resources.mlflow_registry import CANDIDATE, MlflowRegistry
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


def _edit(config: PipelineConfig, store: ArtifactStore, variant: str) -> dict:
    """Run the variant's edit (one engine call); returns the manifest."""
    from transformers import AutoConfig

    from memkfac.targets import parse_layers

    model, _ = split_variant(variant)
    spec = config.edit_of(variant)
    subject = subject_model_dir(config, store, model)
    out = store.edit_dir(variant)
    layers = parse_layers(spec.layers, AutoConfig.from_pretrained(subject).num_hidden_layers)
    if spec.method == "balanced_subnet":
        from memkfac.balanced_subnet import BSNArguments, train_balanced_subnet
        from memkfac.corpora import load_split

        args = BSNArguments(layers=layers, projections=spec.projections, seed=spec.seed, **spec.options)
        retain = load_split(store.corpus_dir(model), "finetune").tolist()
        return train_balanced_subnet(
            subject, _forget_sequences(store, subject), retain, args, out, progress=False, overwrite=True
        )
    from memkfac.editing import EditArguments, edit_model

    edit = EditArguments(
        layers=layers,
        projections=spec.projections,
        keep_mass=spec.keep_mass,
        method=spec.method,
        svd_drop=spec.svd_drop,
        seed=spec.seed,
        **spec.options,
    )
    eig = None if spec.method == "svd" else store.eigen_dir(model)
    return edit_model(subject, eig, edit, out, progress=False, overwrite=True)


def _canary_sequences(store: ArtifactStore, tokenizer, keep=lambda probe: True) -> list[list[int]]:
    """Token ids (prefix + suffix) of the canaries that ``keep`` selects."""
    from assets.models import CANARY_PROBE_SET
    from memkfac.generation import probe_token_ids
    from memkfac.probes import load_probe_set

    probes = load_probe_set(store.probe_file(CANARY_PROBE_SET))
    return [sum(probe_token_ids(p, tokenizer), []) for p in probes if keep(p)]


def _forget_sequences(store: ArtifactStore, model_dir: Path) -> list[list[int]]:
    """BalancedSubnet's forget set: the sweep half of the memorized canaries (the holdout half stays
    unseen, as for the K-FAC edit's tuning)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _canary_sequences(store, tokenizer, lambda p: p.kind == "memorized" and p.split == "sweep")


def build(config: PipelineConfig, parts: Partitions) -> list:
    @dg.asset(
        partitions_def=parts.variant,
        deps=[
            dg.AssetDep("subject_model", partition_mapping=parts.model_to_variants),
            dg.AssetDep("kfac_eigenbasis", partition_mapping=parts.model_to_variants),
            dg.AssetDep("corpus", partition_mapping=parts.model_to_variants),
            dg.AssetDep("canaries"),  # BalancedSubnet's forget set
        ],
        group_name=GROUP,
        kinds={"pytorch", "safetensors"},
        code_version="edit-v1",
        automation_condition=BUILD,
        pool="compute",
        description="The variant's model: a K-FAC edit (or a control: per-side, SVD, random basis, or the "
        "BalancedSubnet baseline) written as a Hugging Face checkpoint with memkfac_manifest.json.",
    )
    def edited_model(context: dg.AssetExecutionContext, store: ArtifactStore) -> dg.MaterializeResult:
        variant = context.partition_key
        spec = config.edit_of(variant)
        if spec is None:
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
        manifest = _edit(config, store, variant)
        modules = manifest.get("modules", [])
        kept = [m["frac_kept"] for m in modules if m.get("frac_kept") is not None]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(store.edit_dir(variant))),
                "method": spec.method,
                "keep_mass": spec.keep_mass,
                "layers": spec.layers,
                "modules_edited": len(modules),
                "mean_fraction_of_components_kept": sum(kept) / len(kept) if kept else 1.0,
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
        "the manifest names the current inputs (subject model, weights, factors, keep_mass).",
    )
    def edited_model_valid(
        context: dg.AssetCheckExecutionContext, store: ArtifactStore
    ) -> dg.AssetCheckResult:
        import torch

        from memkfac.checkpoint import load_manifest
        from memkfac.finetune import collate
        from memkfac.models import load_model

        variant = context.partition_key
        model_name, _ = split_variant(variant)
        path = variant_model_dir(config, store, variant)
        model, tokenizer = load_model(path)
        batch = collate(_canary_sequences(store, tokenizer)[:CHECK_PROBES], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finite = bool(torch.isfinite(logits[batch["attention_mask"].bool()]).all())  # padding aside
        problems = [] if finite else ["non-finite logits"]
        spec = config.edit_of(variant)
        if spec is not None:
            manifest = load_manifest(path)
            subject = subject_model_dir(config, store, model_name)
            if manifest["base_model"]["fingerprint"] != model_fingerprint(subject):
                problems.append("manifest base fingerprint differs from the subject model")
            if manifest["model_fingerprint"] != model_fingerprint(path):
                problems.append("manifest weight fingerprint differs from the files")
            eig = manifest.get("eigenbasis")
            if eig is not None:
                index_sha = sha256_file(store.factor_dir(model_name) / "index.json")
                if eig["factor_index_sha256"] != index_sha:
                    problems.append("manifest eigenbasis comes from other factors than the current ones")
            if spec.method != "balanced_subnet" and manifest["config"]["keep_mass"] != spec.keep_mass:
                problems.append("manifest keep_mass differs from the config")
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={
                "finite_logits": finite,
                "problems": dg.MetadataValue.json(problems),
                "probes": len(batch["input_ids"]),
                "tokens": int(batch["attention_mask"].sum()),
            },
        )

    @dg.asset(
        partitions_def=parts.edit_variant,
        deps=[dg.AssetDep(edited_model, partition_mapping=parts.variant_to_edit)],
        group_name=GROUP,
        kinds={"mlflow"},
        code_version="register-v1",
        automation_condition=DATA_EAGER,
        description="The edit as an MLflow run (params, metrics, manifest) and a registered model version "
        "(transformers flavor) named after the variant, with alias 'candidate'.",
    )
    def registered_model(
        context: dg.AssetExecutionContext, store: ArtifactStore, mlflow: MlflowRegistry
    ) -> dg.MaterializeResult:
        from memkfac.checkpoint import MANIFEST_NAME, load_manifest

        variant = context.partition_key
        spec = config.edit_of(variant)
        path = store.edit_dir(variant)
        params = {
            "variant": variant,
            "method": spec.method,
            "layers": spec.layers,
            "projections": ",".join(spec.projections),
            "keep_mass": spec.keep_mass,
            **{f"option.{k}": v for k, v in spec.options.items()},
        }
        manifest = load_manifest(path)
        kept = [m["frac_kept"] for m in manifest.get("modules", []) if m.get("frac_kept") is not None]
        metrics = {"mean_fraction_of_components_kept": sum(kept) / len(kept)} if kept else {}
        artifacts = {"manifest": path / MANIFEST_NAME}
        tags = {"dagster_run_id": context.run.run_id, "variant": variant, "kind": "edit"}
        run_id = mlflow.log_run(f"edit {variant}", params, metrics, tags, artifacts, model_dir=path)
        version = mlflow.register(variant, run_id, tags={"variant": variant})
        return dg.MaterializeResult(
            metadata={
                "mlflow_run_id": run_id,
                "registered_model": variant,
                "version": version,
                "uri": f"models:/{variant}@{CANDIDATE}",
            }
        )

    return [edited_model, edited_model_valid, registered_model]
